"""The large-model path at mid size on CPU: real architectures from config at reduced width (a 12-layer CLIP tower
and a 12-layer Qwen2 LM, ~100 M parameters, random init), 2 Ray Train workers, ZeRO-3, bf16, LoRA, frozen vision
tower, gradient checkpointing, every MEGL term; 3 steps, then a fresh model resumed from the step-2 checkpoint."""

import pytest

from megl_ray.config import load_config, packaged_config

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.slow, pytest.mark.shared_ray]  # ~1 min on 2 CPU cores


def test_midsize_zero3_bf16_lora_checkpointing_trains_partitions_and_resumes_exactly(tmp_path, shared_ray):
    from megl_ray.data.reader import bundled_dataset_uri, read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model.vlm import load_tokenizer
    from megl_ray.probes.resume import run_resume_probe

    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    rows = read_split(uri, "train", info).slice(0, 200).to_pylist()
    cfg = load_config(
        packaged_config("tiny"),
        [
            "model.tiny_hidden_size=768",
            "model.tiny_layers=12",
            "model.lora_r=8",
            "model.freeze_vision=true",
            "model.gradient_checkpointing=true",
            "model.max_text_tokens=12",
            "train.precision=bf16",
            "train.zero_stage=3",
            "train.num_workers=2",
            "data.batch_size=2",
            "loss.dc_weight=0.5",
            "optim.lr=0.001",
        ],
    )
    masked, plain = [r for r in rows if r["has_mask"]], [r for r in rows if not r["has_mask"]]
    # 3 global batches of 4 (2 per worker), each with one masked sample: L_visual and L_dc in every step
    batch_rows = [r for i in range(3) for r in (masked[i], plain[3 * i], plain[3 * i + 1], plain[3 * i + 2])]
    tokenizer = load_tokenizer(cfg.model, [t for r in rows for t in r["rationales"]] + info.classes)
    ranks = run_resume_probe(
        cfg, tokenizer, info.num_classes, batch_rows, info.mask_size, steps=3, save_at=2, storage_path=str(tmp_path)
    )
    total = ranks[0]["total_param_bytes"]
    report = {r["rank"]: round(r["local_param_bytes"] / total, 3) for r in ranks}
    print("partitioned parameter bytes per rank / model total:", report, "total bytes:", total)
    assert 150e6 < total < 400e6  # ~100 M parameters, most of them frozen in bf16
    assert all(share <= 0.55 for share in report.values()), report
    first = ranks[0]
    assert first["terms"] == ["ce", "dc", "loss", "text", "visual"]
    assert len(first["losses"]) == 3 and all(v == v and v < 1e3 for v in first["losses"])
    assert first["resumed_from"] == 2
    assert first["resumed_losses"][0] == pytest.approx(first["losses"][2], rel=1e-6)

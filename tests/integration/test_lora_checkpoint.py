"""A LoRA + frozen-vision run on the real-preset path (clip-qwen2 from local base checkpoints): its DeepSpeed
checkpoint holds no frozen tensor (file bytes vs what the trainable parameters and their optimizer state need),
resuming from it is exact, its export holds only what training changed and evaluates with
``python -m megl_ray.evaluate`` to the in-memory model's accuracy, and ``--merge`` writes a standalone export."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megl_ray.config import load_config, packaged_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _engine(cfg, num_classes, tokenizer, prior):
    import deepspeed

    from megl_ray.model import build_megl_model
    from megl_ray.training.ds_config import deepspeed_config, trainable_parameters
    from megl_ray.training.optim import build_optimizer, build_scheduler

    torch.manual_seed(cfg.train.seed)
    model = build_megl_model(cfg, num_classes, tokenizer=tokenizer, prior=prior)
    optimizer = build_optimizer(model, cfg.optim)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(optimizer, cfg.optim, 10),
        config=deepspeed_config(cfg, False, trainable_parameters(model)),
        dist_init_required=False,
    )
    return engine


def _step(engine, batch):
    out = engine(**batch)
    engine.backward(out.loss)
    engine.step()
    return out.loss.item()


@pytest.fixture(scope="module")
def distributed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # what a launcher sets: DeepSpeed reads LOCAL_RANK even when the process group exists
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    if created:  # later tests of the session must not find a process group of ours
        dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _accuracy(model, cfg, uri, info):
    from megl_ray.data.reader import iter_row_batches, read_split
    from megl_ray.data.transforms import model_batch, preprocess_rows

    correct = total = 0
    for rows in iter_row_batches(read_split(uri, "test", info), 64, epoch=0, seed=0, shuffle=False):
        pre = preprocess_rows(
            {k: [r[k] for r in rows] for k in rows[0]},
            model.tokenizer,
            cfg.model.image_size,
            info.mask_size,
            cfg.data.max_rationales,
            cfg.model.max_text_tokens,
        )
        batch = model_batch(pre, model.tokenizer, cfg.model.prompt_template, model.num_image_tokens, 0, 0)
        probs, _ = model.predict(batch["pixels"])
        correct += int((probs.argmax(1) == batch["labels"]).sum())
        total += len(rows)
    return correct / total


def test_lora_checkpoint_excludes_frozen_tensors_resumes_exactly_and_exports_what_changed(distributed, tmp_path):
    from megl_ray.data.reader import bundled_dataset_uri, read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model.export_io import exported_state, load_export, save_export
    from megl_ray.model.vlm import load_tokenizer
    from megl_ray.training.checkpoints import TrainState, load_checkpoint, save_checkpoint
    from megl_ray.training.local import make_batch
    from tests.support.base_models import make_clip_qwen2_base

    uri = bundled_dataset_uri()
    info = load_dataset_info(uri)
    rows = read_split(uri, "train", info).slice(0, 24).to_pylist()
    corpus = [t for r in rows for t in r["rationales"]] + info.classes
    vision, lm = make_clip_qwen2_base(tmp_path / "base", corpus, hidden=128, layers=4)
    cfg = load_config(
        packaged_config("tiny"),
        [
            "model.preset=clip-qwen2",
            f"model.vision_path={vision}",
            f"model.lm_path={lm}",
            "model.lora_r=4",
            "model.freeze_vision=true",
            "model.max_text_tokens=16",
            "data.batch_size=8",
            "train.num_workers=1",
            "loss.dc_weight=0.5",
            "train.zero_stage=2",
        ],
    )
    tokenizer = load_tokenizer(cfg.model)
    prior = torch.as_tensor(info.prior_array())
    engine = _engine(cfg, info.num_classes, tokenizer, prior)
    model = engine.module
    batches = [make_batch(rows[i * 8 : (i + 1) * 8], model, cfg, info.mask_size, 0) for i in range(3)]
    losses = [_step(engine, b) for b in batches[:2]]
    save_checkpoint(engine, TrainState(step=2), tmp_path / "ckpt", 0)
    losses.append(_step(engine, batches[2]))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen * 4 > 0.5 * trainable * 16  # including the frozen tensors would break the bound below
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora > 0 and not any(p.requires_grad for p in model.vlm.model.vision_tower.parameters())
    # tensor files only: the tokenizer (kB) rides along so that a checkpoint exports on its own
    files = sum(f.stat().st_size for f in (tmp_path / "ckpt").rglob("*") if f.is_file() and "tokenizer" not in f.parts)
    need = trainable * (4 + 12)  # fp32 weight + ZeRO's fp32 partition copy + two AdamW moments
    assert files <= 1.2 * need, (files, need, frozen)

    resumed = _engine(cfg, info.num_classes, tokenizer, prior)
    assert load_checkpoint(resumed, tmp_path / "ckpt", 0).step == 2
    assert _step(resumed, batches[2]) == pytest.approx(losses[2], rel=1e-6)

    state = exported_state(model, cfg)
    assert not any(k.startswith("vlm.model.vision_tower.") for k in state)
    assert not any(k.startswith("vlm.model.language_model.") and "lora_" not in k for k in state)
    assert any("lora_" in k for k in state) and any(k.startswith("classifier.") for k in state)
    assert any(k.startswith("vlm.model.multi_modal_projector.") for k in state) and "prior" in state
    export = str(tmp_path / "export")
    save_export(model, cfg, info.classes, export, state=state)
    assert json.loads((Path(export) / "meta.json").read_text())["omitted"] > 0
    want = _accuracy(model.eval(), cfg, uri, info)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "megl_ray.evaluate",
            "--checkpoint",
            export,
            "--data",
            uri,
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "eval.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["accuracy"] == pytest.approx(want, abs=1e-6)  # fp32 metric

    merged = str(tmp_path / "merged")
    run = subprocess.run(
        # fp32 on request (bf16 is the default): the merged model must then compute exactly what the LoRA one does
        [sys.executable, "-m", "megl_ray.export", "--merge", export, merged, "--dtype", "float32"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["merged_lora_layers"] == 4 * 4
    lora_model = load_export(export).model
    shutil.rmtree(tmp_path / "base")  # standalone: the base checkpoints are no longer needed
    standalone = load_export(merged).model
    assert not any("lora_" in k for k in standalone.state_dict())
    batch = batches[0]
    a, b = lora_model(**batch), standalone(**batch)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    assert torch.equal(a.logits, b.logits)

"""Exports in the ecosystem's formats (``megl_ray.model.hf_export``). A llava-preset export with LoRA — its base a tiny
LLaVA placed in an offline HF cache and named by id — loads with peft over that base, and its merge's ``vlm/`` with
plain transformers (model and processor), generating what megl_ray generates; the model card and the MEGL-only file
hold what they document."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from peft import PeftConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from megl_ray import export as export_command
from megl_ray.cli import run_cli
from megl_ray.config import load_config
from megl_ray.data.transforms import encode_prompt, format_prompt
from megl_ray.errors import UserError
from megl_ray.evaluation.inference import load_for_inference
from megl_ray.model import build_megl_model
from megl_ray.model.export_io import load_export, save_export
from megl_ray.model.export_merge import merge_export
from megl_ray.model.vlm import CLIP_MEAN, CLIP_STD, build_tiny
from tests.support.hf_cache import SHA1, place_in_cache

CORPUS = ["a round digit", "a straight stroke", "zero", "one", "two", "a loop on top", "a bar across"]
CLASSES = ["zero", "one", "two"]


@pytest.fixture
def llava_export(tmp_path, offline_cache):
    """A base LLaVA ``tiny-org/llava`` (with a licence in its card) and an export over it: LoRA r=4 with non-zero
    B factors and a moved projector, so that the adapter changes what the base computes; SDTG off."""
    torch.manual_seed(0)
    bundle = build_tiny(load_config().model, CORPUS)
    base = tmp_path / "llava"
    bundle.model.save_pretrained(str(base))
    bundle.tokenizer.save_pretrained(str(base))
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny LLaVA\n")
    place_in_cache(offline_cache, "tiny-org/llava", base, SHA1)
    overrides = [
        "model.preset=llava",
        "model.vlm_path=tiny-org/llava",
        "model.lora_r=4",
        "model.sdtg=false",
        "model.freeze_vision=true",
        "model.max_text_tokens=6",
    ]
    cfg = load_config(None, overrides)
    model = build_megl_model(cfg, len(CLASSES))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "multi_modal_projector" in name:
                param.add_(torch.randn_like(param) * 0.3)
    extra = {"test_accuracy": 0.5, "test_miou": 0.25, "data_uri": "s3://bucket/digits"}
    src = Path(save_export(model, cfg, CLASSES, str(tmp_path / "export"), extra=extra))
    dst = tmp_path / "merged"
    summary = merge_export(str(src), str(dst), vlm_dtype="float32")
    return SimpleNamespace(src=src, dst=dst, cfg=cfg, model=model, summary=summary)


def _lora_layers(cfg) -> int:
    """The LoRA-wrapped layers: every targeted projection of every layer of the base's LM."""
    return cfg.model.tiny_layers * len(cfg.model.lora_target_modules)


def _inputs(exported_model, cfg, label: str, seed: int = 0):
    """(prompt ids, pixel values for the tower, pixels in [0, 1]) as megl_ray builds them for one image."""
    torch.manual_seed(seed)
    pixels = torch.rand(1, 3, exported_model.pixel_size, exported_model.pixel_size)
    side = exported_model.vision_image_size
    image = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    image = (image - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ids = encode_prompt(exported_model.tokenizer, cfg.model.prompt_template, label, exported_model.num_image_tokens)
    return torch.tensor([ids]), image, pixels


def test_peft_over_the_base_by_id_gives_the_merged_models_logits(llava_export):
    adapter = llava_export.src / "adapter"
    config = PeftConfig.from_pretrained(str(adapter))
    assert config.base_model_name_or_path == "tiny-org/llava" and config.revision == SHA1
    base = LlavaForConditionalGeneration.from_pretrained("tiny-org/llava")  # by id, offline, from the HF cache
    plain_logits = None
    ids, image, _ = _inputs(llava_export.model, llava_export.cfg, "one")
    with torch.no_grad():
        plain_logits = base(input_ids=ids, pixel_values=image).logits
        adapted = PeftModel.from_pretrained(base, str(adapter)).eval()
        adapted_logits = adapted(input_ids=ids, pixel_values=image).logits
    merged, info = LlavaForConditionalGeneration.from_pretrained(
        str(llava_export.dst / "vlm"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        merged_logits = merged.eval()(input_ids=ids, pixel_values=image).logits
    torch.testing.assert_close(adapted_logits, merged_logits, atol=1e-4, rtol=0)
    assert (plain_logits - merged_logits).abs().max() > 1e-2  # the adapter (LoRA and projector) changed the model
    assert llava_export.summary["merged_lora_layers"] == _lora_layers(llava_export.cfg)
    assert merged.dtype == torch.float32


def test_the_transformers_vlm_and_processor_generate_what_megl_ray_generates(llava_export):
    vlm_dir = llava_export.dst / "vlm"
    processor = AutoProcessor.from_pretrained(str(vlm_dir))
    merged = LlavaForConditionalGeneration.from_pretrained(str(vlm_dir)).eval()
    exported, placement = load_for_inference(str(llava_export.src), "cpu", "fp32")
    assert placement.lora_merged == _lora_layers(llava_export.cfg)
    model, cfg = exported.model, exported.config
    for seed, label in enumerate(CLASSES):
        ids, image, pixels = _inputs(model, cfg, label, seed)
        before, after = format_prompt(cfg.model.prompt_template, label)
        processed = processor(text=before + "<image>" + after, images=pixels[0], do_rescale=False, return_tensors="pt")
        # the processor expands <image> as megl_ray does; megl_ray puts BOS first itself, which the tiny preset's
        # tokenizer does not add on its own (LLaMA's does)
        adds_bos = model.tokenizer("x")["input_ids"][0] == model.tokenizer.bos_token_id
        assert processed["input_ids"].tolist() == (ids if adds_bos else ids[:, 1:]).tolist()
        assert tuple(processed["pixel_values"].shape) == tuple(image.shape)
        ours = model.generate(pixels, [label], max_new_tokens=6)
        with torch.no_grad():
            out = merged.generate(
                input_ids=ids,
                pixel_values=image,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=model.tokenizer.eos_token_id,
                pad_token_id=model.tokenizer.pad_token_id,
            )
        theirs = model.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        assert [t.strip() for t in theirs] == ours


def test_the_model_card_names_the_base_its_revision_licence_and_results(llava_export):
    card = ModelCard.load(str(llava_export.src / "README.md"))
    assert card.data.base_model == ["tiny-org/llava"] and card.data.license == "apache-2.0"
    assert f"`tiny-org/llava` (revision `{SHA1}`), licence apache-2.0" in card.text
    assert "test_accuracy: 0.5" in card.text and "test_miou: 0.25" in card.text and "s3://bucket/digits" in card.text
    assert "PeftModel.from_pretrained" in card.text and "--merge" in card.text
    merged_card = ModelCard.load(str(llava_export.dst / "README.md"))
    assert "AutoProcessor.from_pretrained('vlm')" in merged_card.text and "test_accuracy: 0.5" in merged_card.text


def test_megl_parts_hold_the_sdtg_projection_and_the_prior(export):
    """The suite's trained tiny export (SDTG on): ``megl_parts.safetensors`` holds W_I and Ā, the tensors of the
    export itself, with a description of each; a run without LoRA writes no adapter, and a card without bases
    claims no licence."""
    root = Path(export)
    parts = load_file(str(root / "megl_parts.safetensors"))
    weights = load_file(str(root / "model.safetensors"))
    assert set(parts) == {"fusion.proj.weight", "fusion.proj.bias", "prior"}
    for name, tensor in parts.items():
        assert torch.equal(tensor, weights[name]), name
    with safe_open(str(root / "megl_parts.safetensors"), framework="pt") as f:
        described = json.loads(f.metadata()["megl_ray"])
    assert set(described) == {"fusion.proj", "prior"}
    assert not (root / "adapter").exists()
    card = ModelCard.load(str(root / "README.md"))  # no base, so no licence to state
    assert card.data.license is None and "every weight is in this export" in card.text


def test_a_moved_base_is_found_again_with_base_path(llava_export, offline_cache, tmp_path, capsys):
    """The export names its base by id; once the id no longer resolves, ``--base-path`` re-points it (here at the
    folder the base was moved to) — and a role the preset does not have is one line."""
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(offline_cache / "models--tiny-org--llava"), str(elsewhere))
    with pytest.raises(UserError, match="tiny-org/llava"):
        load_export(str(llava_export.src))
    moved = str(elsewhere / "snapshots" / SHA1)
    argv = ["--merge", "--base-path", moved, "--dtype", "float32", str(llava_export.src), str(tmp_path / "again")]
    assert run_cli("megl_ray.export", export_command.main, argv) == 0
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["merged_lora_layers"]
    assert merged == _lora_layers(llava_export.cfg)
    repointed = load_export(str(llava_export.src), base_path=(f"vlm={moved}",))
    assert repointed.config.model.vlm_path == moved
    argv = ["--merge", "--base-path", f"lm={moved}", str(llava_export.src), str(tmp_path / "never")]
    assert run_cli("megl_ray.export", export_command.main, argv) == 2
    err = capsys.readouterr().err
    assert "--base-path lm=" in err and "one of vlm" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()

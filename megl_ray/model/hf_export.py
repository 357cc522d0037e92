"""An export in the formats the ecosystem loads, beside the project's own files (``export_io``):

    adapter/                 a PEFT adapter over the LLaVA base (``PeftModel.from_pretrained(base, adapter)``):
                             ``adapter_config.json`` + ``adapter_model.safetensors`` — the LoRA weights of the LM and,
                             as ``modules_to_save``, every other VLM module training changed (the projector W_A, the
                             vision tower when it was trained). Written only for exports that hold LoRA layers.
    vlm/                     ``python -m megl_ray.export --merge`` only: LoRA merged (peft ``merge_and_unload``), a
                             ``save_pretrained`` ``LlavaForConditionalGeneration`` (bf16 unless asked otherwise) with
                             its tokenizer and a ``LlavaProcessor`` (``AutoProcessor.from_pretrained(vlm)``)
    megl_parts.safetensors   what is MEGL's alone, outside any transformers class: ``fusion.proj.weight`` and
                             ``fusion.proj.bias`` (SDTG's W_I, (hidden, classifier channels): the LM-side image tokens
                             gain W_I·Z_I, Z_I the classifier's last feature map resized to the token grid) and
                             ``prior`` (Ā, the mean normalised ground-truth map, the L_dc target)
    README.md                the model card (``huggingface_hub.ModelCard``): bases and revisions, data, config, the
                             run's test metrics, how to load each part, the bases' licences

``classifier/`` (torchvision layout) is written by ``export_io``. No module here imports Ray.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import save_file
from transformers import AutoProcessor, CLIPImageProcessor, LlavaProcessor

from megl_ray.config import MEGLConfig
from megl_ray.errors import UserError
from megl_ray.model.checkpoint_io import local_dir
from megl_ray.model.hub import TOKENIZER_FILES, is_hub_id
from megl_ray.model.vlm import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN

ADAPTER_DIR = "adapter"
VLM_DIR = "vlm"
MEGL_PARTS_FILE = "megl_parts.safetensors"
CARD_FILE = "README.md"
ADAPTER = "default"  # the adapter name peft gives an injected LoRA (and removes from saved keys)
PEFT_PREFIX = "base_model.model."  # PeftModel → LoraModel → the LLaVA model: saved keys start here
VLM_PREFIX = "vlm."  # the LLaVA model inside MEGLModel's state dict
LM_PATH = "model.language_model"


def has_lora(state: dict[str, torch.Tensor]) -> bool:
    return any(".lora_A." in name for name in state)


def adapter_config(cfg: MEGLConfig, modules_to_save: list[str]) -> LoraConfig:
    """The LoRA of training, re-targeted at the whole LLaVA: a regular expression keeps the targets inside the LM
    (CLIP's attention has ``q_proj``/``v_proj`` too, which the run never adapted)."""
    m = cfg.model
    targets = "|".join(re.escape(t) for t in m.lora_target_modules)
    return LoraConfig(
        r=m.lora_r,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=rf".*{re.escape(LM_PATH)}\..*\.({targets})",
        bias="none",
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=m.vlm_path if m.preset == "llava" else None,
        revision=_revision(m.vlm_path) if m.preset == "llava" else None,
    )


def adapter_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(PEFT's saved tensors, ``modules_to_save``) from an export's state: LoRA tensors renamed by peft's own key
    rule; every other VLM tensor the export holds belongs to a module saved whole (the projector, a trained tower).
    """
    saved: dict[str, torch.Tensor] = {}
    modules: set[str] = set()
    for name, tensor in state.items():
        if not name.startswith(VLM_PREFIX):
            continue
        inner = name[len(VLM_PREFIX) :]
        if ".lora_" in inner:
            saved[LoraModel._remove_adapter_name_from_key(PEFT_PREFIX + inner, ADAPTER)] = tensor
        else:
            saved[PEFT_PREFIX + inner] = tensor
            # the module saved whole: the VLM's child that holds it (``model.multi_modal_projector``, ``lm_head``)
            parts = inner.split(".")
            modules.add(parts[1] if parts[0] == "model" and len(parts) > 2 else parts[0])
    return saved, sorted(modules)


def save_adapter(folder: Path, cfg: MEGLConfig, state: dict[str, torch.Tensor]) -> None:
    """``adapter/`` (see the module docstring) from an export's state."""
    tensors, modules = adapter_state(state)
    folder.mkdir(parents=True, exist_ok=True)
    adapter_config(cfg, modules).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge_adapter(vlm: Any, adapter: Path) -> Any:
    """The LLaVA model with ``adapter`` loaded and merged by peft (``PeftModel.from_pretrained`` +
    ``merge_and_unload``); ``vlm`` must hold no LoRA layers."""
    return PeftModel.from_pretrained(vlm, str(adapter)).merge_and_unload()


def save_megl_parts(path: Path, state: dict[str, torch.Tensor]) -> None:
    parts = {k: v for k, v in state.items() if k.startswith("fusion.") or k == "prior"}
    meta = {
        "fusion.proj": "SDTG W_I: image tokens += fusion.proj(Z_I resized to the token grid, flattened)",
        "prior": "mean normalised ground-truth map (the L_dc target)",
    }
    save_file(parts, str(path), metadata={"format": "pt", "megl_ray": json.dumps(meta)})


def llava_processor(cfg: MEGLConfig, vlm: Any, tokenizer: Any) -> Any:
    """The base's processor where the llava preset's base has one; else one matching how megl_ray feeds the tower
    (a square resize to the tower's side, CLIP's normalisation)."""
    if cfg.model.preset == "llava":
        try:
            base = AutoProcessor.from_pretrained(str(local_dir(cfg.model.vlm_path)))
            base.tokenizer = tokenizer
            return base
        except (OSError, ValueError, TypeError):  # a base without processor files: built below
            pass
    vision = vlm.config.vision_config
    side = vision.image_size
    images = CLIPImageProcessor(
        size={"height": side, "width": side},
        do_center_crop=False,
        resample=2,  # PIL bilinear, as megl_ray's antialiased resize
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=vlm.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token, which the "default" strategy drops
        image_token=IMAGE_TOKEN,
        chat_template=getattr(tokenizer, "chat_template", None),
    )


SHARD_FLOOR = 64 * 2**20
"""The smallest ``vlm/`` shard (bytes): small models stay one file."""


def save_vlm(folder: Path, cfg: MEGLConfig, vlm: Any, tokenizer: Any, dtype: torch.dtype) -> None:
    """``vlm/``: a ``save_pretrained`` LLaVA (no LoRA layers left) with its tokenizer and processor, in shards of
    at most an eighth of the model: safetensors turns a whole shard into bytes before writing it, so a one-shard 7B
    would be a second model in host RAM (with eight, 1/8 of one)."""
    vlm = vlm.to(dtype)
    size = sum(p.numel() * p.element_size() for p in vlm.parameters())
    vlm.save_pretrained(str(folder), max_shard_size=max(SHARD_FLOOR, size // 8))
    tokenizer.save_pretrained(str(folder))
    llava_processor(cfg, vlm, tokenizer).save_pretrained(str(folder))


def _revision(uri: str | None) -> str | None:
    """The commit a hub id resolved to (its snapshot folder's name in the HF cache), else None."""
    if not uri or not is_hub_id(uri) or Path(uri).exists():
        return None
    try:
        return local_dir(uri, allow_patterns=TOKENIZER_FILES).name
    except UserError:  # not resolvable here (offline, not cached): the card names the id alone
        return None


def _licence(uri: str) -> str | None:
    """The ``license`` of a base's own model card, where it has one."""
    if not (is_hub_id(uri) or Path(uri).is_dir()):
        return None
    try:
        card = local_dir(uri, allow_patterns=[CARD_FILE, *TOKENIZER_FILES]) / CARD_FILE
        return ModelCard.load(str(card)).data.license if card.is_file() else None
    except (UserError, OSError, ValueError, AttributeError):  # unreachable, or a card that does not parse
        return None


def bases(cfg: MEGLConfig) -> list[tuple[str, str]]:
    """(role, path or id) of every base checkpoint the export's config names."""
    m = cfg.model
    named = {"vlm": m.vlm_path, "vision": m.vision_path, "lm": m.lm_path}
    used = {"llava": ("vlm",), "clip-qwen2": ("vision", "lm")}.get(m.preset, ())
    out = [(role, named[role]) for role in used if named[role]]
    weights = m.classifier_weights
    if weights:
        out.append(("classifier", weights))
    return out


def write_card(root: Path, cfg: MEGLConfig, meta: dict[str, Any], files: set[str]) -> None:
    """README.md: the model card of an export."""
    named = bases(cfg)
    licences = {path: _licence(path) for role, path in named if role != "classifier" and "://" not in path}
    known = sorted({v for v in licences.values() if v})
    data = ModelCardData(
        license=known[0] if len(known) == 1 else ("other" if known else None),  # none known: said by no field
        library_name="megl_ray",
        base_model=[path.split("@")[0] for _, path in named if is_hub_id(path) and not Path(path).exists()] or None,
        tags=["megl", "explanation-guided-learning", "llava", "image-classification"],
        metrics=["accuracy", "mean_iou"],
    )
    metrics = {k: meta[k] for k in ("test_accuracy", "test_miou", "steps") if meta.get(k) is not None}
    lines = [
        f"# MEGL model ({cfg.model.classifier} + {cfg.model.preset})",
        "",
        "Trained with megl_ray (Multimodal Explanation-Guided Learning, arXiv 2411.13053): an image classifier,",
        "its Grad-CAM saliency Â, and a LLaVA-style model that writes the rationale grounded on Â (SDTG).",
        "",
        "## Bases",
        *(
            f"- {role}: `{path}`"
            + (f" (revision `{rev}`)" if (rev := _revision(path)) else "")
            + (f", licence {licences[path]}" if licences.get(path) else "")
            for role, path in named
        ),
        *(["- none: every weight is in this export (random-init preset)"] if not named else []),
        "",
        "## Data and configuration",
        f"- data: `{meta.get('data_uri', cfg.data.uri)}`; classes: {', '.join(meta['classes'])}",
        f"- config: `config.yaml` (SDTG {'on' if cfg.model.sdtg else 'off'}, LoRA r={cfg.model.lora_r}, "
        f"lr {cfg.optim.lr}, {cfg.train.epochs} epochs, λ_text {cfg.loss.text_weight}, λ_vis {cfg.loss.visual_weight})",
        "",
        "## Results",
        *(f"- {k}: {v}" for k, v in metrics.items()),
        *(["- not evaluated on a test split"] if "test_accuracy" not in metrics else []),
        "",
        "## Loading",
        "- everything, as trained: `megl_ray.model.export_io.load_export(path)` (or `python -m megl_ray.evaluate`)",
    ]
    if "classifier" in files:
        lines.append(
            f"- classifier: `torchvision.models.{cfg.model.classifier}(num_classes={meta['num_classes']})`"
            ".load_state_dict(safetensors.torch.load_file('classifier/model.safetensors')); input as in "
            "`classifier/config.json`"
        )
    if ADAPTER_DIR in files:
        lines.append(
            "- adapter: `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(BASE), 'adapter')`"
            + ("" if cfg.model.preset == "llava" else " with BASE the CLIP + LM LLaVA megl_ray assembled")
        )
    if VLM_DIR in files:
        lines.append(
            "- vlm: `LlavaForConditionalGeneration.from_pretrained('vlm')`, `AutoProcessor.from_pretrained('vlm')`"
        )
    else:
        lines.append(
            "- vlm: `python -m megl_ray.export --merge THIS DST` writes `DST/vlm/` (transformers, LoRA merged)"
        )
    lines += [
        f"- `{MEGL_PARTS_FILE}`: SDTG's W_I (`fusion.proj.*`) and the prior Ā (`prior`)",
        "",
        "## What the plain LLaVA does not do",
        "The transformers model is LLaVA alone. With SDTG on, megl_ray feeds the tower I ⊙ Â (the image weighted by",
        "the classifier's saliency) and adds W_I·Z_I to the image tokens; a plain `generate` on the raw image gives",
        "other rationales. With SDTG off and the same pixels and prompt ids, it generates the same tokens. The",
        "processor resizes with PIL (bilinear); megl_ray resizes tensors (bilinear, antialiased): pixel values differ",
        "slightly.",
        "",
    ]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(lines))
    card.save(str(root / CARD_FILE))

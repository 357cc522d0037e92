"""Exported MEGL weights: what training leaves for evaluation and explanation, loadable without Ray or DeepSpeed.

An export is a directory (local or ``s3://``):
    model.safetensors   what training changed: every trainable tensor (classifier, projector, SDTG fusion, LoRA
                        adapters), every buffer (prior Ā, BatchNorm statistics), and frozen parameters only when no
                        base checkpoint named in the config holds them (the random-init tiny preset)
    config.yaml         the resolved MEGLConfig the model was built from (it names the base checkpoints)
    tokenizer/          the tokenizer (``save_pretrained``), which the tiny preset trained on the corpus
    meta.json           classes, number of classes, format version, what produced it, ``omitted`` (how many
                        frozen base tensors are left to the base checkpoints), ``standalone``
    vlm_config.json     only in a standalone export: the VLM's architecture, so loading needs no base checkpoint
    classifier/         a ResNet classifier with its linear head, for torchvision alone: ``model.safetensors`` in
                        torchvision's layout (``torchvision.models.resnet18(num_classes=N).load_state_dict``) and
                        ``config.json`` (builder, classes, input size and normalisation)
    adapter/ vlm/ megl_parts.safetensors README.md
                        the ecosystem's formats (PEFT adapter, transformers LLaVA from ``--merge``, MEGL's own
                        tensors, model card): ``megl_ray.model.hf_export``

Loading rebuilds the model from ``config.yaml`` (real presets load their base checkpoints from the paths in it) and
then loads ``model.safetensors``; every tensor it lacks must be a frozen base tensor. safetensors holds tensors
only, so loading never unpickles objects. Every file is checked where it is read (``check_export``, ``load_export``):
a damaged or foreign export is one clear ``UserError`` naming the file, never a traceback from its parser.
``megl_ray.model.export_merge.merge_export`` (``python -m megl_ray.export --merge SRC DST``) writes a standalone export:
LoRA merged into the base weights by peft, every tensor included, no base checkpoint needed, and ``vlm/``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights

from megl_ray import storage
from megl_ray.config import MEGLConfig, config_from_dict, safe_io
from megl_ray.config.strict_yaml import load_yaml_file
from megl_ray.errors import UserError
from megl_ray.model import build_megl_model
from megl_ray.model.checkpoint_io import local_dir
from megl_ray.model.classifier import IMAGENET_MEAN, IMAGENET_STD
from megl_ray.model.classifier_weights import to_torchvision_layout
from megl_ray.model.hf_export import (
    ADAPTER_DIR,
    MEGL_PARTS_FILE,
    VLM_DIR,
    has_lora,
    merge_adapter,
    save_adapter,
    save_megl_parts,
    save_vlm,
    write_card,
)
from megl_ray.model.precision import PRECISION_OF
from megl_ray.model.safetensors_stream import write_safetensors
from megl_ray.model.vlm import VLMBundle, _num_image_tokens, set_memory_options

FORMAT_VERSION = 1
VLM_CONFIG_FILE = "vlm_config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
CLASSIFIER_DIR = "classifier"
log = logging.getLogger(__name__)


@dataclass
class Exported:
    model: Any  # MEGLModel
    config: MEGLConfig
    classes: list[str]
    meta: dict[str, Any]
    lora_merged: int = 0
    """LoRA layers folded into their base layers at load (``load_export(merge_lora=True)``)."""


def base_prefixes(cfg: MEGLConfig) -> tuple[str, ...]:
    """State-dict prefixes whose frozen parameters come from a base checkpoint the config names: the VLM of the
    real presets. The classifier (≤ 90 MB) is always exported whole, so it loads without its base weights."""
    return ("vlm.",) if cfg.model.preset in ("llava", "clip-qwen2") else ()


def exported_names(model: Any, cfg: MEGLConfig, standalone: bool = False) -> set[str]:
    """State-dict names an export holds (see the module docstring)."""
    frozen_base = (
        set()
        if standalone
        else {
            name
            for name, p in model.named_parameters(remove_duplicate=False)
            if not p.requires_grad and name.startswith(base_prefixes(cfg))
        }
    )
    return {name for name in model.state_dict(keep_vars=True) if name not in frozen_base}


def exported_state(
    model: Any, cfg: MEGLConfig, gather: Callable | None = None, keep: bool = True, standalone: bool = False
) -> dict[str, torch.Tensor] | None:
    """The tensors of an export, on CPU. ``gather(params)``, for ZeRO-3, is a context manager that materialises
    partitioned parameters: it is entered module by module (every rank, collectively) and only for tensors the
    export holds, so a frozen 7B base is never gathered and no more than one module is whole at a time. Ranks
    with ``keep=False`` take part in the gathers and return None."""
    names = exported_names(model, cfg, standalone)
    by_param: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in names:
            by_param.setdefault(id(tensor), []).append(name)
    state: dict[str, torch.Tensor] = {}
    for _, module in model.named_modules():
        params = [p for _, p in module.named_parameters(recurse=False) if id(p) in by_param]
        tensors = params + [b for _, b in module.named_buffers(recurse=False) if id(b) in by_param]
        if not tensors:
            continue
        with gather(params) if gather is not None and params else contextlib.nullcontext():
            if keep:
                for tensor in tensors:
                    for name in by_param[id(tensor)]:
                        value = tensor.detach().cpu().contiguous()
                        # A gathered ZeRO-3 parameter is released when its module's gather ends: keep a copy. A
                        # host tensor is written as it is (``write_safetensors`` takes shared storages): a copy of
                        # every tensor was a second model in host RAM while a 7B export was written.
                        shared = value.data_ptr() == tensor.data_ptr()  # .cpu() of a host tensor copies nothing
                        state[name] = value.clone() if gather is not None and shared else value
    return state if keep else None


def save_export(
    model: Any,
    cfg: MEGLConfig,
    classes: list[str],
    dst: str,
    extra: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    standalone: bool = False,
    vlm_dtype: torch.dtype | None = None,
) -> str:
    """Write ``model`` (a MEGLModel) as an export to a local directory or ``s3://`` prefix; returns ``dst``.
    ``state`` (from ``exported_state``) is used when given, e.g. gathered from ZeRO-3 shards. ``vlm_dtype`` also
    writes ``vlm/`` (a transformers LLaVA in that dtype; the model's VLM is cast in place, after its tensors are
    taken: a model with no LoRA layers left, see ``merge_export``)."""
    if state is None:
        state = exported_state(model, cfg, standalone=standalone)
    with tempfile.TemporaryDirectory(prefix="megl-export-") as tmp:
        root = Path(tmp)
        write_safetensors(root / WEIGHTS_FILE, state)
        (root / CONFIG_FILE).write_text(cfg.to_yaml())
        model.tokenizer.save_pretrained(str(root / TOKENIZER_DIR))
        if standalone:
            (root / VLM_CONFIG_FILE).write_text(model.vlm.config.to_json_string())
        omitted = len(set(model.state_dict(keep_vars=True)) - set(state))
        meta = {
            "format_version": FORMAT_VERSION,
            "classes": list(classes),
            "num_classes": len(classes),
            "omitted": omitted,
            "standalone": standalone,
            # the decode side (classifier's or vision tower's, the larger): what a classifier-only reader needs
            "pixel_size": int(getattr(model, "pixel_size", cfg.model.image_size)),
            **(extra or {}),
        }
        (root / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        _save_torchvision_classifier(root / CLASSIFIER_DIR, state, cfg, classes, meta["pixel_size"])
        save_megl_parts(root / MEGL_PARTS_FILE, state)
        if has_lora(state):  # what training changed in the VLM: frozen tensors (the tiny preset exports them) stay out
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            save_adapter(root / ADAPTER_DIR, cfg, {k: v for k, v in state.items() if k in trainable})
        if vlm_dtype is not None:
            save_vlm(root / VLM_DIR, cfg, model.vlm, model.tokenizer, vlm_dtype)
        write_card(root, cfg, meta, {p.name for p in root.iterdir()})
        if dst.startswith("s3://"):
            storage.upload(str(root), dst)
        else:
            out = Path(dst)
            out.mkdir(parents=True, exist_ok=True)
            for item in root.iterdir():
                target = out / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                shutil.move(str(item), str(target))
    return dst


def _save_torchvision_classifier(
    folder: Path, state: dict[str, torch.Tensor], cfg: MEGLConfig, classes: list[str], pixel_size: int
) -> None:
    """``classifier/`` for a ResNet with the linear head whose every tensor is in ``state`` (else nothing: a frozen
    classifier's weights are its base's)."""
    if not cfg.model.classifier.startswith("resnet") or cfg.model.classifier_head != "linear":
        return
    own = {k[len("classifier.") :]: v for k, v in state.items() if k.startswith("classifier.")}
    if "head.weight" not in own or "backbone.stem.0.weight" not in own:
        return
    folder.mkdir()
    write_safetensors(folder / WEIGHTS_FILE, to_torchvision_layout(own, cfg.model.classifier))
    config = {
        "builder": f"torchvision.models.{cfg.model.classifier}",
        "num_classes": len(classes),
        "classes": list(classes),
        "image_size": cfg.model.image_size,
        "decoded_size": pixel_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "input": "RGB in [0, 1], resized to image_size, normalised with mean and std (ImageNet's)",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _standalone_vlm(root: Path, cfg: MEGLConfig, tokenizer: Any, dtype: torch.dtype) -> Any:
    """The VLM of a standalone export: its architecture from ``vlm_config.json``, weights from the export (loaded
    over it by ``load_export``). Built in ``dtype`` and without initialising its weights (transformers'
    ``no_init_weights``): random values for 7 B parameters would be minutes of CPU, all overwritten."""
    config = LlavaConfig.from_json_file(str(root / VLM_CONFIG_FILE))
    # The dtype asked for, not the one each (sub-)config was saved with, which transformers would build in
    for part in (config, config.text_config, config.vision_config):
        part.dtype = dtype
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    # Loaded to run or to be written again, not to train: frozen, so that a 16-bit load keeps it 16-bit (the
    # precision rules keep trainable weights in fp32)
    model.requires_grad_(False)
    set_memory_options(model, cfg.model)
    return VLMBundle(
        model, tokenizer, config.image_token_id, _num_image_tokens(config), config.vision_config.image_size
    )


def _read_meta(root: Path, uri: str) -> dict[str, Any]:
    try:
        meta = json.loads(safe_io.read_text(root / META_FILE, safe_io.TEXT_LIMIT, META_FILE))
    except safe_io.FileProblem as problem:
        raise UserError(f"{uri}: {problem.detail}") from None
    except (ValueError, RecursionError) as err:
        raise UserError(f"{uri}: {META_FILE} is not valid JSON ({str(err)[:120] or type(err).__name__})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{uri}: {META_FILE} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{uri}: export format {meta.get('format_version')!r} is not supported ({FORMAT_VERSION})")
    classes, num = meta.get("classes"), meta.get("num_classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise UserError(f"{uri}: {META_FILE} 'classes' must be a non-empty list of names")
    if not isinstance(num, int) or isinstance(num, bool) or num != len(classes):
        raise UserError(f"{uri}: {META_FILE} 'num_classes' is {num!r}, but 'classes' names {len(classes)}")
    return meta


def check_export(uri: str) -> tuple[Path, dict[str, Any]]:
    """(local directory, validated ``meta.json``) of an export, without building the model."""
    root = local_dir(uri)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE, TOKENIZER_DIR) if not (root / name).exists()]
    if missing and (root / "train_state.json").is_file():
        raise UserError(
            f"{uri} is a training checkpoint, not an export: write its export with "
            f"python -m megl_ray.export --from-checkpoint {uri} DST"
        )
    if missing:
        raise UserError(f"{uri} is not a megl_ray export (missing {', '.join(missing)})")
    return root, _read_meta(root, uri)


def load_export_config(root: Path, uri: str) -> MEGLConfig:
    """The export's validated ``config.yaml`` (a ``UserError`` naming the file otherwise)."""
    try:
        return config_from_dict(load_yaml_file(root / CONFIG_FILE, CONFIG_FILE))
    except UserError as err:
        raise UserError(f"{uri}: {CONFIG_FILE}: {err}") from None


def _load_tokenizer(root: Path, uri: str) -> Any:
    path = root / TOKENIZER_DIR
    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(f"{uri}: {TOKENIZER_DIR}/ is empty or not a directory (no saved tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # what transformers raises on bad files
        raise UserError(f"{uri}: cannot load {TOKENIZER_DIR}/: {str(err).splitlines()[0][:200]}") from None


def _load_weights(root: Path, uri: str) -> dict[str, torch.Tensor]:
    try:
        safe_io.check_regular_file(root / WEIGHTS_FILE, WEIGHTS_FILE)
        return load_file(str(root / WEIGHTS_FILE))
    except safe_io.FileProblem as problem:
        raise UserError(f"{uri}: {problem.detail}") from None
    except (SafetensorError, OSError, ValueError) as err:  # truncated, corrupt header, not safetensors at all
        raise UserError(f"{uri}: {WEIGHTS_FILE} is not a readable safetensors file ({str(err)[:200]})") from None


def load_export(
    uri: str,
    device: str | torch.device = "cpu",
    merge_lora: bool = False,
    base_path: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> Exported:
    """Rebuild the MEGL model of an export; clear one-line errors for a missing, damaged or foreign directory.
    ``merge_lora`` folds LoRA adapters into their base layers with peft (``adapter/`` loaded by
    ``PeftModel.from_pretrained`` and ``merge_and_unload``-ed): the model holds plain layers afterwards.
    ``base_path`` re-points the base checkpoints its config names (``repoint``). ``dtype`` (bfloat16/float16) builds
    the VLM as training's precision does: frozen weights loaded in that dtype from the start (a 7B base never
    exists in fp32 on the host), trainable ones and norms fp32 — run it under autocast, or cast it
    (``evaluation.inference.prepare_for_inference``)."""
    root, meta = check_export(uri)
    cfg = repoint(load_export_config(root, uri), base_path, uri)
    standalone = bool(meta.get("standalone"))
    state = _load_weights(root, uri)
    merge = merge_lora and has_lora(state)
    # Merging: built without LoRA layers, the LM frozen as LoRA froze it (the same tensors are the export's)
    fixed = [f"train.precision={PRECISION_OF[dtype]}", "model.classifier_weights=null"]
    fixed += ["model.lora_r=0", "model.freeze_lm=true"] if merge else []
    # Trained with flash-attn, read where it is not installed (a laptop, a CPU node): the same weights under SDPA
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        log.info("%s: trained with flash_attention_2, loaded with sdpa (flash-attn is not installed here)", uri)
        fixed.append("model.attn_implementation=sdpa")
    build_cfg = config_from_dict(cfg.to_dict(), fixed)
    tokenizer = _load_tokenizer(root, uri)
    try:
        vlm = _standalone_vlm(root, build_cfg, tokenizer, dtype) if standalone else None
    except (OSError, ValueError) as err:  # a missing or corrupt vlm_config.json
        raise UserError(f"{uri}: cannot read {VLM_CONFIG_FILE}: {str(err).splitlines()[0][:200]}") from None
    model = build_megl_model(
        build_cfg, int(meta["num_classes"]), tokenizer=tokenizer, prior=state.get("prior"), vlm=vlm
    )
    loaded = _without_lora(state) if merge else state
    own = model.state_dict()
    mismatched = [k for k, v in loaded.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    unexpected = sorted(set(loaded) - set(own))
    absent = sorted(exported_names(model, cfg, standalone) - set(loaded))
    if mismatched or unexpected or absent:
        raise UserError(
            f"{uri}: weights do not fit the model its config builds (shape mismatch {mismatched[:3]}, "
            f"unexpected {unexpected[:3]}, missing {absent[:3]})"
        )
    model.load_state_dict(loaded, strict=False)
    merged = 0
    if merge:
        with tempfile.TemporaryDirectory(prefix="megl-adapter-") as tmp:
            save_adapter(Path(tmp), cfg, {k: v for k, v in state.items() if ".lora_" in k})
            model.vlm = merge_adapter(model.vlm, Path(tmp))
        merged = len({k.split(".lora_")[0] for k in state if ".lora_A." in k})
    model.to(device).eval()
    return Exported(model=model, config=cfg, classes=list(meta["classes"]), meta=meta, lora_merged=merged)


BASE_ROLES = {"llava": ("vlm",), "clip-qwen2": ("vision", "lm")}
"""The base checkpoints each real preset names, as ``--base-path ROLE=PATH`` calls them."""


def repoint(cfg: MEGLConfig, base_path: tuple[str, ...], uri: str = "export") -> MEGLConfig:
    """``cfg`` with its base checkpoints moved: ``PATH`` (the preset's only base) or ``ROLE=PATH`` per base
    (``vlm``, ``vision``, ``lm``), each a local folder, ``s3://`` prefix or hub id."""
    if not base_path:
        return cfg
    roles = BASE_ROLES.get(cfg.model.preset, ())
    if not roles:
        raise UserError(f"{uri}: --base-path: a {cfg.model.preset}-preset export has no base checkpoint to re-point")
    overrides = []
    for value in base_path:
        role, sep, path = value.partition("=")
        if not sep:
            if len(roles) > 1:
                raise UserError(
                    f"--base-path {value}: a {cfg.model.preset} export has bases {', '.join(roles)}: "
                    "name each (--base-path vision=PATH --base-path lm=PATH)"
                )
            role, path = roles[0], value
        if role not in roles or not path:
            raise UserError(f"--base-path {value}: expected PATH or ROLE=PATH with ROLE one of {', '.join(roles)}")
        overrides.append(f"model.{role}_path={path}")
    return config_from_dict(cfg.to_dict(), overrides)


def _without_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An export's tensors under the names of the model without LoRA layers: adapters dropped (they are merged
    after loading), a wrapped layer's ``base_layer.`` removed (peft's own naming of the layer it wraps)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}

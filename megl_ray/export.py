"""Exported MEGL weights: what training leaves for evaluation and explanation, loadable without Ray or DeepSpeed.

An export is a directory (local or ``s3://``):
    model.safetensors   the MEGLModel state dict (classifier, VLM incl. LoRA layers, SDTG fusion, prior Ā)
    config.yaml         the resolved MEGLConfig the model was built from
    tokenizer/          the tokenizer (``save_pretrained``), which the tiny preset trained on the corpus
    meta.json           classes, number of classes, format version, what produced it

Loading rebuilds the model from ``config.yaml`` (real presets load their base checkpoints from the paths in it) and
then loads ``model.safetensors`` strictly: safetensors holds tensors only, so loading never unpickles objects. Every
file is checked where it is read (``check_export``, ``load_export``): a damaged or foreign export is one clear
``UserError`` naming the file, never a traceback from the library that parses it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megl_ray import safe_io
from megl_ray.config import MEGLConfig, config_from_dict
from megl_ray.errors import UserError

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class Exported:
    model: Any  # MEGLModel
    config: MEGLConfig
    classes: list[str]
    meta: dict[str, Any]


def save_export(model: Any, cfg: MEGLConfig, classes: list[str], dst: str, extra: dict[str, Any] | None = None) -> str:
    """Write ``model`` (a MEGLModel) as an export to a local directory or ``s3://`` prefix; returns ``dst``."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="megl-export-") as tmp:
        root = Path(tmp)
        # clone(): tied or shared storages (e.g. tied embeddings) cannot be saved as separate safetensors entries
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(root / WEIGHTS_FILE))
        (root / CONFIG_FILE).write_text(cfg.to_yaml())
        model.tokenizer.save_pretrained(str(root / TOKENIZER_DIR))
        meta = {"format_version": FORMAT_VERSION, "classes": list(classes), "num_classes": len(classes),
                **(extra or {})}
        (root / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if dst.startswith("s3://"):
            from megl_ray import storage

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
    from megl_ray.model.checkpoint_io import local_dir

    root = local_dir(uri)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE, TOKENIZER_DIR) if not (root / name).exists()]
    if missing:
        raise UserError(f"{uri} is not a megl_ray export (missing {', '.join(missing)})")
    return root, _read_meta(root, uri)


def load_export_config(root: Path, uri: str) -> MEGLConfig:
    """The export's validated ``config.yaml`` (a ``UserError`` naming the file otherwise)."""
    from megl_ray.strict_yaml import load_yaml_file

    try:
        return config_from_dict(load_yaml_file(root / CONFIG_FILE, CONFIG_FILE))
    except UserError as err:
        raise UserError(f"{uri}: {CONFIG_FILE}: {err}") from None


def _load_tokenizer(root: Path, uri: str) -> Any:
    from transformers import AutoTokenizer

    path = root / TOKENIZER_DIR
    if not path.is_dir() or not any(path.iterdir()):
        raise UserError(f"{uri}: {TOKENIZER_DIR}/ is empty or not a directory (no saved tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # what transformers raises on bad files
        raise UserError(f"{uri}: cannot load {TOKENIZER_DIR}/: {str(err).splitlines()[0][:200]}") from None


def _load_weights(root: Path, uri: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        safe_io.check_regular_file(root / WEIGHTS_FILE, WEIGHTS_FILE)
        return load_file(str(root / WEIGHTS_FILE))
    except safe_io.FileProblem as problem:
        raise UserError(f"{uri}: {problem.detail}") from None
    except (SafetensorError, OSError, ValueError) as err:  # truncated, corrupt header, not safetensors at all
        raise UserError(f"{uri}: {WEIGHTS_FILE} is not a readable safetensors file ({str(err)[:200]})") from None


def load_export(uri: str, device: str | torch.device = "cpu") -> Exported:
    """Rebuild the MEGL model of an export; clear one-line errors for a missing, damaged or foreign directory."""
    from megl_ray.model import build_megl_model

    root, meta = check_export(uri)
    cfg = load_export_config(root, uri)
    tokenizer = _load_tokenizer(root, uri)
    state = _load_weights(root, uri)
    model = build_megl_model(cfg, int(meta["num_classes"]), tokenizer=tokenizer, prior=state.get("prior"))
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    unexpected = sorted(set(state) - set(own))
    absent = sorted(set(own) - set(state))
    if mismatched or unexpected or absent:
        raise UserError(f"{uri}: weights do not fit the model its config builds (shape mismatch {mismatched[:3]}, "
                        f"unexpected {unexpected[:3]}, missing {absent[:3]})")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    return Exported(model=model, config=cfg, classes=list(meta["classes"]), meta=meta)

"""Exported MEGL weights: what training leaves for evaluation and explanation, loadable without Ray or DeepSpeed.

An export is a directory (local or ``s3://``):
    model.safetensors   the MEGLModel state dict (classifier, VLM incl. LoRA layers, SDTG fusion, prior Ā)
    config.yaml         the resolved MEGLConfig the model was built from
    tokenizer/          the tokenizer (``save_pretrained``), which the tiny preset trained on the corpus
    meta.json           classes, number of classes, format version, what produced it

Loading rebuilds the model from ``config.yaml`` (real presets load their base checkpoints from the paths in it) and
then loads ``model.safetensors`` strictly: safetensors holds tensors only, so loading never unpickles objects.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

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


def load_export(uri: str, device: str | torch.device = "cpu") -> Exported:
    """Rebuild the MEGL model of an export; clear one-line errors for a missing or foreign directory."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from megl_ray.model import build_megl_model
    from megl_ray.model.checkpoint_io import local_dir

    root = local_dir(uri)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE, META_FILE, TOKENIZER_DIR) if not (root / name).exists()]
    if missing:
        raise UserError(f"{uri} is not a megl_ray export (missing {', '.join(missing)})")
    meta = json.loads((root / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{uri}: export format {meta.get('format_version')} is not supported ({FORMAT_VERSION})")
    cfg = config_from_dict(yaml.safe_load((root / CONFIG_FILE).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
    state = load_file(str(root / WEIGHTS_FILE))
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

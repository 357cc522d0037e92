"""``python -m megl_ray.export --from-checkpoint CKPT DST``: a training checkpoint (any one a run kept, not only the
last) as an export that ``evaluate`` and ``explain`` load.

The weights are DeepSpeed's fp32 master copies, consolidated over every rank's ZeRO partition by DeepSpeed's own
``zero_to_fp32`` (stage 2 and 3 alike); the model is rebuilt from the config and tokenizer the checkpoint holds, its
frozen base tensors from the base checkpoints that config names. Imports DeepSpeed (the command imports this
lazily, after parsing its arguments)."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.utils import zero_to_fp32
from transformers import AutoTokenizer

from megl_ray.config import config_from_dict
from megl_ray.errors import UserError
from megl_ray.model import build_megl_model
from megl_ray.model.checkpoint_io import local_dir
from megl_ray.model.export_io import save_export
from megl_ray.training.checkpoints import DS_TAG, SAFE_GLOBALS, STATE_FILE, TOKENIZER_DIR


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """``torch.load`` with ``weights_only=True`` while DeepSpeed's converter runs: it passes ``weights_only=False``
    itself, and a checkpoint read back from shared storage must not be able to run code."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def export_checkpoint(src: str, dst: str) -> dict[str, Any]:
    """Write the export of the training checkpoint at ``src`` (local or ``s3://``) to ``dst``."""
    root = local_dir(src)
    if not (root / STATE_FILE).is_file():
        raise UserError(f"{src} is not a megl_ray training checkpoint (no {STATE_FILE})")
    state = json.loads((root / STATE_FILE).read_text())
    if not (root / TOKENIZER_DIR).is_dir() or not state.get("classes"):
        raise UserError(
            f"{src} was written before checkpoints held their tokenizer and classes: export the run's own export "
            "(python -m megl_ray.export --merge RUN/export DST), or resume the run once to write a new checkpoint"
        )
    cfg = config_from_dict(state["config"])
    with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):  # its progress prints: stdout ends in JSON
        weights = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
            str(root), tag=DS_TAG, exclude_frozen_parameters=True
        )
    tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
    build_cfg = config_from_dict(cfg.to_dict(), ["train.precision=fp32", "model.classifier_weights=null"])
    classes = list(state["classes"])
    # The seed the workers built with: frozen tensors of a random-init preset (not in the checkpoint) come out alike
    torch.manual_seed(cfg.train.seed)
    model = build_megl_model(build_cfg, len(classes), tokenizer=tokenizer, prior=weights.get("prior"))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    absent = sorted({name for name, p in model.named_parameters() if p.requires_grad} - set(weights))
    if unexpected or absent:
        raise UserError(
            f"{src}: the checkpoint's weights do not fit the model its config builds "
            f"(unexpected {unexpected[:3]}, missing {absent[:3]})"
        )
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    extra = {"data_uri": cfg.data.uri, "steps": state["step"], "checkpoint": src}
    save_export(model, cfg, classes, dst, extra=extra)
    return {"export": dst, "checkpoint": src, "epoch": state["epoch"], "step": state["step"], "tensors": len(weights)}

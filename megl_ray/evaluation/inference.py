"""Running an exported MEGL model for evaluation and explanation: where it runs, at which precision, and one batch
of stored rows through it. No Ray here; ``megl_ray.evaluate`` wires Ray Data around ``run_batch``.

Device and precision are resolved by whoever holds the model (the process for ``--workers 1``, each Ray actor
otherwise), never by a driver that may sit on a CPU-only head node. ``auto`` means CUDA where this process sees a
GPU, and on a GPU the VLM runs in bfloat16; the classifier (whose Grad-CAM saliency the explanation metrics score)
stays in float32, which costs little: it is a small fraction of the parameters.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megl_ray.data.transforms import preprocess_rows
from megl_ray.errors import UserError
from megl_ray.evaluation.options import PRECISIONS
from megl_ray.model.export_io import load_export
from megl_ray.model.precision import keep_norms_fp32

log = logging.getLogger("megl_ray.evaluation.inference")


def resolve_device(name: str) -> str:
    """'auto' → cuda when this process sees a GPU, else cpu; 'cuda' without a GPU is the user's error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return name


def resolve_dtype(precision: str, device: str) -> torch.dtype:
    """'auto' → bfloat16 on CUDA (half the memory and the tensor cores), float32 on CPU (where bf16 is slow)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


@dataclass
class Placement:
    """Where one model copy runs: what an evaluation reports per process (and per Ray actor)."""

    device: str
    dtype: str
    pid: int
    host: str
    node: str | None
    lora_merged: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _node_id() -> str | None:
    try:
        # Lazy: inference runs in plain processes too (train_local, a bare GPU machine without Ray installed).
        import ray  # noqa: PLC0415

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # not in a Ray worker, or an older Ray: the host name still says where
        return None


def prepare_for_inference(exported: Any, device: str = "auto", precision: str = "auto") -> Placement:
    """Make a loaded export ready to predict, in place: device and dtype resolved here, VLM (and SDTG projection)
    cast, eval mode. Load it with ``load_export(merge_lora=True)`` (LoRA folded into the base layers by peft, in
    float32 before any cast) so that inference runs plain linear layers. Returns where it now runs."""
    resolved = resolve_device(device)
    dtype = resolve_dtype(precision, resolved)
    model = exported.model
    merged = exported.lora_merged
    if dtype != torch.float32:
        model.vlm.to(dtype)
        keep_norms_fp32(model.vlm)  # norms compute in fp32 on 16-bit inputs, as in training
        if model.fusion is not None:
            model.fusion.to(dtype)
    model.to(resolved).eval()
    placement = Placement(
        device=resolved,
        dtype=str(dtype).replace("torch.", ""),
        pid=os.getpid(),
        host=socket.gethostname(),
        node=_node_id(),
        lora_merged=merged,
    )
    log.info("model on %s (%s, %d LoRA layers merged), pid %d", resolved, placement.dtype, merged, placement.pid)
    return placement


def load_for_inference(
    uri: str, device: str = "auto", precision: str = "auto", base_path: tuple[str, ...] = ()
) -> tuple[Any, Placement]:
    """The export at ``uri`` (its bases re-pointed by ``base_path``), loaded on the CPU in the dtype it will run
    in (a 7B base is read in bf16, never materialised in fp32 on the host) and then ``prepare_for_inference``-d.
    Returns (Exported, Placement)."""
    dtype = resolve_dtype(precision, resolve_device(device))  # a bad --device/--precision fails before the load
    exported = load_export(uri, device="cpu", merge_lora=True, base_path=base_path, dtype=dtype)
    return exported, prepare_for_inference(exported, device, precision)


def run_batch(
    exported: Any,
    columns: dict[str, list[Any]],
    mask_size: int,
    num_beams: int,
    max_new_tokens: int | None = None,
    clip: Any = None,
) -> dict[str, np.ndarray]:
    """One batch of stored rows (columnar) → targets and model outputs: label, has_mask, mask (uint8), probs,
    saliency of the predicted class, the rationale generated for the predicted class (at most ``max_new_tokens``
    tokens; default the trained ``model.max_text_tokens``) and, with a ``clip`` scorer, each rationale's CLIPScore
    against its image."""
    model, cfg = exported.model, exported.config
    # The training transform, so that pixels are exactly what the model saw during validation (uint8-rounded).
    pre = preprocess_rows(
        columns, model.tokenizer, model.pixel_size, mask_size, 1, cfg.model.max_text_tokens, cfg.model.image_aspect
    )
    device = next(model.classifier.parameters()).device
    pixels = torch.as_tensor(pre["pixels"]).float().div_(255.0).to(device)
    probs, saliency = model.predict(pixels)
    names = [exported.classes[i] for i in probs.argmax(dim=1).tolist()]
    generated = model.generate(
        pixels, names, max_new_tokens=max_new_tokens or cfg.model.max_text_tokens, num_beams=num_beams
    )
    out = {
        "label": pre["label"],
        "has_mask": pre["has_mask"],
        "mask": pre["mask"],
        "probs": probs.float().cpu().numpy(),
        "saliency": saliency.float().cpu().numpy(),
        "generated": np.asarray(generated, dtype=object),
    }
    if clip is not None:
        out["clip_score"] = clip.score_bytes(list(columns["image"]), generated)
    return out

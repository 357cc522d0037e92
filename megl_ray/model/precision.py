"""Mixed precision of MEGL training: the mechanism, and the parts that always compute in fp32.

Mechanism: ``train.precision=bf16|fp16`` runs the forward under ``torch.autocast`` — DeepSpeed's ``torch_autocast``
config section, so the engine enters it around every forward — over **fp32 master weights**: trainable parameters
stay fp32 and are what the optimizer steps; matmuls and convolutions run in 16 bits. Frozen weights (a frozen CLIP
tower, a LoRA run's base LM) have no optimizer state, so they are stored in 16 bits (``prepare_model``): a 7B LoRA
run keeps 13 GiB of frozen LM instead of 26 GiB.

Why not DeepSpeed's ``bf16.enabled`` (bf16 weights, fp32 master copy in the ZeRO optimizer): DeepSpeed 0.19 casts
*parameters only* (``engine._cast_module_mixed_precision``), so the first forward feeds fp32 pixels into a bf16 conv
("Input type (float) and bias type (BFloat16) should be the same"), a BatchNorm with bf16 weights and fp32 running
stats fails next ("mixed dtype (CPU): expect parameter to have scalar type of Float", reproduced on CPU), and every
model input and every fp32 island (norms, saliency, losses) would need hand-written casts at module boundaries.
Autocast handles the boundaries by op type and the memory is the same: 16 bytes per trainable parameter in both
(fp32 weight + fp32 grad + two Adam moments, versus bf16 weight + bf16 grad + fp32 master + moments), with ZeRO's
own fp32 partition copy on top in both. Measured on CPU (tests/integration/test_distributed_numerics.py, DeepSpeed's
CPU accelerator): 2 workers, ZeRO-2 and ZeRO-3, tiny preset (GroupNorm) and ResNet-18 (BatchNorm in train mode), all
MEGL terms: the bf16 losses of the first 4 steps are finite and within 3e-2 of fp32, where DeepSpeed's ``bf16``
section fails at the first forward. No GPU was available to measure speed; ``bench/gpu_step.py`` does. ``fp16`` is
the same mechanism with DeepSpeed's GradScaler (loss scaling) for pre-Ampere GPUs.

fp32 whatever the precision: normalisation layers (BatchNorm, GroupNorm, LayerNorm, RMSNorm: their statistics
and eps), the saliency normalisation (a max-normalised map, eps 1e-8) and the CE, text, visual and KL losses
(eps 1e-6 vanishes in bf16) — ``compute_in_fp32`` and ``keep_norms_fp32``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISION_OF = {torch.float32: "fp32", **{dtype: name for name, dtype in HALF.items()}}
"""``train.precision``'s name of a dtype (the inverse of ``autocast_dtype``)."""


def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` (None: fp32, no autocast)."""
    return HALF.get(precision or "fp32")


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
        return value.float()
    return value


def compute_in_fp32(fn: Callable) -> Callable:
    """Decorator: run ``fn`` with autocast off and its floating tensor arguments upcast to fp32."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*[_to_fp32(a) for a in args], **{k: _to_fp32(v) for k, v in kwargs.items()})

    return run


def is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)) or name.endswith(
        ("RMSNorm", "LayerNorm")
    )


class _FP32Norm:
    """Mixin put in front of a norm layer's class: its forward runs in fp32, the output keeps the input's dtype."""

    def forward(self, x, *args, **kwargs):  # type: ignore[override]
        if x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return super().forward(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), *args, **kwargs).to(x.dtype)


_FP32_CLASSES: dict[type, type] = {}


def _fp32_class(cls: type) -> type:
    if cls not in _FP32_CLASSES:
        new = type(f"FP32{cls.__name__}", (_FP32Norm, cls), {"__module__": __name__})
        new.__qualname__ = new.__name__
        globals()[new.__name__] = new  # importable by name, so a model holding one still pickles
        _FP32_CLASSES[cls] = new
    return _FP32_CLASSES[cls]


def keep_norms_fp32(model: nn.Module) -> int:
    """Make every normalisation layer compute in fp32 (its parameters stay fp32); returns how many."""
    count = 0
    for module in model.modules():
        if is_norm(module) and not isinstance(module, _FP32Norm):
            module.__class__ = _fp32_class(type(module))
            count += 1
        if isinstance(module, _FP32Norm):  # again after a ``model.to(bf16)``, which casts them too
            for param in module.parameters(recurse=False):
                param.data = param.data.float()
    return count


def prepare_model(model: nn.Module, precision: str | None) -> nn.Module:
    """Ready a model for ``precision``: norms in fp32; under bf16/fp16 trainable parameters fp32 (the master
    weights) and frozen matmul/conv/embedding weights in 16 bits. A no-op for fp32 beyond upcasting."""
    dtype = autocast_dtype(precision)
    keep_norms_fp32(model)
    for module in model.modules():
        if isinstance(module, _FP32Norm):
            continue
        for param in module.parameters(recurse=False):
            if param.requires_grad or dtype is None:
                param.data = param.data.float()
            elif isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
                param.data = param.data.to(dtype)
            else:
                param.data = param.data.float()
    return model

"""What ``python -m megl_ray.evaluate`` and ``python -m megl_ray.explain`` were asked for: typed, importable without
torch or Ray."""

from __future__ import annotations

import dataclasses

PRECISIONS = ("auto", "fp32", "bf16")
"""VLM weights at inference: auto (bf16 on cuda, fp32 on cpu), fp32, bf16."""
RAY_ROW_THRESHOLD = 2048
"""Without ``workers``, splits with more rows than this go through Ray Data."""


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
    """Options of ``python -m megl_ray.evaluate`` (see its ``--help`` for each)."""

    checkpoint: str
    data: str | None = None
    split: str = "test"
    out: str | None = None
    num_beams: int = 1
    max_new_tokens: int | None = None
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    clip_path: str | None = None
    efficiency: bool = False
    warmup: int = 2
    repeats: int = 5
    base_path: tuple[str, ...] = ()
    """``[ROLE=]PATH`` values re-pointing a non-standalone export's base checkpoints (``export_io.repoint``)."""


# --------------------------------------------------------------------------------------------------- prediction


@dataclasses.dataclass(frozen=True)
class ExplainOptions:
    """Options of ``python -m megl_ray.explain`` (see its ``--help`` for each)."""

    checkpoint: str
    out: str
    images: tuple[str, ...] = ()
    top_k: int = 3
    num_beams: int = 1
    max_new_tokens: int | None = None
    device: str = "auto"
    precision: str = "auto"
    gallery: bool = False
    data: str | None = None
    split: str = "test"
    per_class: int = 3
    batch_size: int = 32
    base_path: tuple[str, ...] = ()

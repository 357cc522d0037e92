"""What ``python -m megl_ray.tune`` was asked for: typed, importable without Ray (the command's ``--help`` and its
errors answer before Ray Tune loads)."""

from __future__ import annotations

import dataclasses

# What the training workers report every epoch (megl_ray.training.worker): validation metrics and loss terms.
METRICS = ("val_accuracy", "val_miou", "loss", "ce", "text", "visual", "dc")


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """The command line of ``python -m megl_ray.tune`` (see its ``--help`` for each option)."""

    space: str
    config: str | None = None
    overrides: tuple[str, ...] = ()
    num_samples: int | None = None
    scheduler: str = "asha"
    metric: str = "val_accuracy"
    mode: str | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0
    max_concurrent: int | None = None
    name: str | None = None
    address: str | None = None
    verbose: bool = False

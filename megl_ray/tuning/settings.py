"""A sweep's settings: the validated form of ``SweepOptions`` the sweep runs with (``SweepSettings``, whose
fingerprint a resumed sweep must match), and the constants of its resource and state bookkeeping."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from megl_ray.config import MEGLConfig, load_config, packaged_config
from megl_ray.config.safe_io import check_name
from megl_ray.errors import UserError
from megl_ray.model.vlm import check_model_sources
from megl_ray.tuning.options import METRICS, SweepOptions
from megl_ray.tuning.space import SearchSpace, load_space

TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
"""What each trial's driver function reserves: no CPU (it builds the datasets, then waits on its Train run; a CPU
share here would be missing for Ray Data), and some memory, as Tune needs a non-empty request."""
DATA_HEADROOM_CPU = 1.0
"""CPU left free for Ray Data: its file-listing task takes a whole CPU (not configurable), and every trial's
datasets list their files; with less than one CPU free they wait forever."""
SWEEP_FILE = "sweep.json"
ASHA_STATE_FILE = "asha_state.yaml"  # not .json: see ResumableASHA


@dataclasses.dataclass
class SweepSettings:
    name: str
    space: SearchSpace
    base: MEGLConfig
    """The base config as given (before the embedded default fills in data and storage)."""
    num_samples: int
    scheduler: str
    metric: str
    mode: str
    grace_period: int
    reduction_factor: float
    max_concurrent: int | None

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a re-run to resume this sweep (Tune restores the original settings)."""
        return {
            "space": self.space.to_dict(),
            "config": self.base.to_dict(),
            "num_samples": self.num_samples,
            "scheduler": self.scheduler,
            "metric": self.metric,
            "mode": self.mode,
            "grace_period": self.grace_period,
            "reduction_factor": self.reduction_factor,
        }


def settings_from(args: SweepOptions) -> SweepSettings:
    """Validated settings of a sweep (one line naming the option for a bad value, before anything starts)."""
    base = load_config(args.config or packaged_config("tiny"), args.overrides)
    check_model_sources(base.model)  # a wrong hub id: one line before the store, the data or Ray
    space = load_space(args.space, base)
    if args.metric not in METRICS:
        raise UserError(f"--metric {args.metric}: not reported by training (valid: {', '.join(METRICS)})")
    mode = args.mode or ("max" if args.metric.startswith("val_") else "min")
    num_samples = args.num_samples if args.num_samples is not None else (1 if space.only_grid() else 4)
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if args.grace_period < 1:
        raise UserError(f"--grace-period must be >= 1, got {args.grace_period}")
    if not (math.isfinite(args.reduction_factor) and args.reduction_factor > 1):  # NaN compares false to all
        raise UserError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    name = args.name or f"sweep-{Path(args.space).stem}"
    problem = check_name(name) or ("must not start with '.'" if name.startswith(".") else None)
    if problem:
        raise UserError(f"--name {problem}, got {name!r}")
    return SweepSettings(
        name,
        space,
        base,
        num_samples,
        args.scheduler,
        args.metric,
        mode,
        args.grace_period,
        args.reduction_factor,
        args.max_concurrent,
    )

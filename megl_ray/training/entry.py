"""What Ray Train runs on every worker (``train_loop_per_worker``): set the environment the driver planned, then run
the loop. A module of its own because DeepSpeed picks its accelerator when it is imported (from ``DS_ACCELERATOR``),
and Ray imports this function's module before calling it."""

from __future__ import annotations

import os
from typing import Any

from megl_ray.cluster.credentials import load_credentials
from megl_ray.training.plan import plan_of


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``loop_config`` holds the driver's typed ``WorkerPlan``."""
    plan = plan_of(loop_config)
    os.environ.update(plan.env)  # S3 endpoint, DS_ACCELERATOR, kernel cache: before DeepSpeed is imported
    load_credentials(plan.credentials_file)  # only what this worker's environment lacks
    # Lazy: the loop imports DeepSpeed, which must see the environment set just above.
    from megl_ray.training.worker import run_worker  # noqa: PLC0415

    run_worker(plan)

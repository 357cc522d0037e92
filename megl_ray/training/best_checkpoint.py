"""The best checkpoint by ``run.checkpoint_metric``: Ray Train keeps it (``CheckpointConfig``'s score attribute,
set by the driver); at the end of training the workers pick it from Ray's own list of kept checkpoints and, with
``run.export_from=best``, load its weights back into the engine before the test split and the export — on the
workers' devices, where the model already is (a 7B model is not reloaded on the driver).

Every checkpoint report carries the metric (NaN where a report has none: a mid-epoch checkpoint has no validation
metric), so Ray ranks those last instead of logging a missing-key error; the latest checkpoint is always kept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray.train

from megl_ray.training.checkpoints import load_checkpoint

REPORTED_WAIT_S = 600.0
"""How long to wait for Ray Train to register the reports in flight (their checkpoints' uploads)."""


def with_metric(reported: dict[str, Any], metric: str | None) -> dict[str, Any]:
    """``reported`` with ``metric`` present (NaN when this report has none of it)."""
    if metric is None or metric in reported:
        return reported
    return {**reported, metric: float("nan")}


def pick_best(reported: list[Any], metric: str, mode: str) -> Any | None:
    """The kept checkpoint with the best finite ``metric`` (the first reached on a tie), or None."""
    best, best_value = None, None
    for item in sorted(reported, key=lambda r: (r.metrics.get("step", 0), r.metrics.get("epoch", 0))):
        value = item.metrics.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if best_value is None or (value > best_value if mode == "max" else value < best_value):
            best, best_value = item, value
    return best


def restore_best(engine: Any, metric: str, mode: str, rank: int, scheme: str, load: bool) -> dict[str, Any]:
    """Collective. Find the best kept checkpoint; with ``load`` and unless it holds the current weights already,
    load it into ``engine``. Returns what ``result.json`` states about it (empty when no checkpoint has the
    metric)."""
    reported = ray.train.get_all_reported_checkpoints(timeout_s=REPORTED_WAIT_S)
    best = pick_best(reported, metric, mode)
    if best is None:
        return {}
    step = int(best.metrics.get("step", 0))
    loaded = load and step != int(engine.global_steps)
    if loaded:
        with best.checkpoint.as_directory() as directory:
            load_checkpoint(engine, Path(directory), rank)
    return {
        "uri": scheme + best.checkpoint.path,
        "metric": metric,
        "mode": mode,
        "value": float(best.metrics[metric]),
        "step": step,
        "epoch": int(best.metrics.get("epoch", 0)),
        "exported": load,
    }

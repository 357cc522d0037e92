"""megl_ray.training.best_checkpoint: which of Ray's kept checkpoints is the best, and reports that always carry
the score attribute (a missing one is an error line in Ray's log and ranks as -inf)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megl_ray.training.best_checkpoint import pick_best, with_metric


@dataclass
class Reported:  # what ray.train.get_all_reported_checkpoints() returns, without a checkpoint to load
    metrics: dict


def _kept(*rows):
    return [Reported({"step": step, "epoch": epoch, **metrics}) for step, epoch, metrics in rows]


def test_the_best_is_the_highest_or_lowest_finite_value_and_the_first_reached_on_a_tie():
    kept = _kept(
        (9, 3, {"val_accuracy": 0.4, "loss": 0.9}),
        (3, 1, {"val_accuracy": 0.6, "loss": 1.5}),
        (5, 1, {"val_accuracy": math.nan, "loss": 0.3}),  # a mid-epoch checkpoint: no validation
        (6, 2, {"val_accuracy": 0.6, "loss": 1.2}),
    )
    assert pick_best(kept, "val_accuracy", "max").metrics["step"] == 3
    assert pick_best(kept, "val_accuracy", "min").metrics["step"] == 9
    assert pick_best(kept, "loss", "min").metrics["step"] == 5
    assert pick_best(_kept((3, 1, {"val_accuracy": math.nan})), "val_accuracy", "max") is None
    assert pick_best([], "loss", "min") is None


def test_every_report_carries_the_metric():
    assert with_metric({"loss": 1.0}, None) == {"loss": 1.0}
    assert with_metric({"val_accuracy": 0.5}, "val_accuracy") == {"val_accuracy": 0.5}
    assert math.isnan(with_metric({"loss": 1.0}, "val_accuracy")["val_accuracy"])

"""A run that diverges stops with one line instead of exporting NaN weights and printing ``NaN`` as success."""

from __future__ import annotations

import math

import pytest

from megl_ray import train_local
from megl_ray.cli import print_result
from tests.support.adversarial import assert_standard_json, assert_user_error, run


def test_train_local_stops_when_the_loss_is_not_finite(tiny_dataset, tmp_path, capsys):
    # A finite but absurd learning rate: accepted by the config, the weights blow up within a few steps.
    argv = [
        f"data.uri={tiny_dataset}",
        "optim.lr=1e10",
        "data.batch_size=4",
        "train.epochs=4",
        "--export",
        str(tmp_path / "export"),
    ]
    outcome = run("megl_ray.train_local", train_local.main, argv, capsys)
    assert_user_error(outcome, "training diverged", "train.max_nonfinite_steps=3")
    assert_standard_json(outcome.out)
    assert not (tmp_path / "export").exists()


def test_the_guard_needs_k_non_finite_steps_in_a_row():
    from megl_ray.training.guards import DivergenceGuard, TrainingDiverged, raise_if_diverged

    guard = DivergenceGuard(3)
    for step, loss in enumerate([math.nan, math.inf, 1.0, math.nan, math.nan], 1):
        guard.check(loss, step)  # never three in a row
    with pytest.raises(TrainingDiverged, match="3 step"):
        guard.check(-math.inf, 6)
    off = DivergenceGuard(0)
    assert not any(off.update(math.nan, s) for s in range(10))
    with pytest.raises(TrainingDiverged, match="boom"):
        raise_if_diverged({"diverged": "boom", "step": 3})
    raise_if_diverged({"step": 3, "loss": 1.0})


def test_results_are_standard_json(capsys):
    print_result({"loss": math.nan, "nested": {"a": [math.inf, 1.5]}, "ok": 2})
    out = capsys.readouterr().out
    assert_standard_json(out)
    assert '"loss": null' in out and "[null, 1.5]" in out

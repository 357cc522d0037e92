"""megl_ray.driver.interruption: the lines an interrupted run ends with, and the command that resumes it."""

from __future__ import annotations

import contextlib
import json
import shlex

import pytest

from megl_ray.cli import run_cli
from megl_ray.driver import fit as driver
from megl_ray.driver.interruption import interrupted_lines, last_checkpoint_step, resume_command
from megl_ray.errors import Interrupted, UserError


def test_the_resume_command_repeats_the_config_and_names_the_run():
    named = resume_command("my config.yaml", ["run.name=exp1", "loss.text_weight=0.5"], "exp1", named=True)
    assert shlex.split(named) == [
        "python", "-m", "megl_ray.train", "--config", "my config.yaml", "run.name=exp1", "loss.text_weight=0.5"
    ]  # fmt: skip
    fresh = resume_command(None, ["train.epochs=3"], "megl-20261206-0930-ab12", named=False)
    assert fresh == "python -m megl_ray.train train.epochs=3 run.name=megl-20261206-0930-ab12"


def test_the_lines_name_the_run_its_last_checkpoint_and_the_command(tmp_path):
    run = tmp_path / "runs" / "exp1"
    assert last_checkpoint_step(str(run)) is None
    run.mkdir(parents=True)
    # what Ray Train V2 keeps (CheckpointManager's snapshot): the latest registered checkpoint, with its metrics
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [],
        "latest_checkpoint_result": {"version": 0, "checkpoint_dir_name": "checkpoint_b", "metrics": {"step": 6}},
        "current_report_index": 2,
    }
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    lines = interrupted_lines("exp1", str(run), "SIGINT", "python -m megl_ray.train run.name=exp1")
    assert lines == (
        f"[megl] run exp1 interrupted (SIGINT); its last checkpoint is at step 6 ({run})",
        "[megl] resume it with: python -m megl_ray.train run.name=exp1",
    )
    assert "it had no checkpoint yet" in interrupted_lines("x", str(tmp_path / "none"), "SIGTERM", "c")[0]


def test_an_interrupted_command_prints_its_lines_and_exits_with_the_signal_code(capsys):
    def stopped(argv):
        raise Interrupted(143, ("[megl] run a interrupted (SIGTERM)", "[megl] resume it with: c"))

    def ctrl_c(argv):
        raise KeyboardInterrupt

    assert run_cli("prog", stopped, []) == 143
    assert capsys.readouterr().err.splitlines() == ["[megl] run a interrupted (SIGTERM)", "[megl] resume it with: c"]
    assert run_cli("prog", ctrl_c, []) == 130 and capsys.readouterr().err == "prog: interrupted\n"


def test_a_run_ray_gave_up_on_or_a_ctrl_c_ends_with_the_resume_command(tmp_path, monkeypatch):
    """``driver.fit.run`` around a failed or interrupted ``fit`` (stood in for: no Ray here): the failure's one line
    ends with the resume command; Ctrl-C becomes ``Interrupted(130)`` with the run's lines."""

    @contextlib.contextmanager
    def resolved(cfg):
        yield cfg

    monkeypatch.setattr(driver, "embedded_default", resolved)
    monkeypatch.setattr(driver, "check_run", lambda cfg, uri: None)
    monkeypatch.setattr(driver.ray, "shutdown", lambda: None)
    options = driver.TrainOptions(overrides=(f"run.storage_path={tmp_path}", "train.epochs=3"))

    def gave_up(*args, **kwargs):
        raise driver.TrainingFailed("training failed: a worker was killed by the OOM killer")

    monkeypatch.setattr(driver, "fit", gave_up)
    with pytest.raises(UserError) as failed:
        driver.run(options)
    message, _, command = str(failed.value).partition("; resume it with: ")
    assert message == "training failed: a worker was killed by the OOM killer"
    assert command.startswith(f"python -m megl_ray.train run.storage_path={tmp_path} train.epochs=3 run.name=megl-")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "fit", ctrl_c)
    with pytest.raises(Interrupted) as stopped:
        driver.run(options)
    assert stopped.value.exit_code == 130 and "interrupted (SIGINT); it had no checkpoint yet" in stopped.value.lines[0]
    assert stopped.value.lines[1].startswith("[megl] resume it with: python -m megl_ray.train run.storage_path=")

"""``python -m megl_ray.tune`` without a sweep: one clear line for a bad space or option, how many trials fit the
cluster, and ASHA's rungs across a restart and a trial's last epoch (the sweep itself: ``tests/integration``)."""

import json
from pathlib import Path

import pytest

from megl_ray.cli import run_cli
from megl_ray.config import load_config
from megl_ray.data.reader import bundled_dataset_uri

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tune-tiny.yaml"


def test_a_bad_space_or_option_is_one_clear_line(tmp_path, capsys):
    from megl_ray import tune

    bad = tmp_path / "bad.yaml"
    bad.write_text("loss.txt_weight: {uniform: [0, 1]}\n")
    lows = tmp_path / "lows.yaml"
    lows.write_text("loss.text_weight: {loguniform: [0, 1]}\n")
    good = tmp_path / "good.yaml"
    good.write_text("optim.lr: {grid: [0.001, 0.002]}\n")
    base = ["--config", str(TINY), f"data.uri={bundled_dataset_uri()}", f"run.storage_path={tmp_path / 'runs'}"]
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "sweep.json").write_text(json.dumps({"space": {"optim.lr": {"grid": [1]}}}))
    cases = [
        (["--space", str(bad)], f"{bad}: loss.txt_weight: unknown config key (did you mean 'loss.text_weight'?)"),
        (["--space", str(lows)], f"{lows}: loss.text_weight: loguniform needs 0 < low"),
        (["--space", str(tmp_path / "missing.yaml")], "search space file not found"),
        (["--space", str(good), "--metric", "accuracy"], "--metric accuracy: not reported by training"),
        (["--space", str(good), "--num-samples", "0"], "--num-samples must be >= 1"),
        (["--space", str(good), "train.epochs=0"], "train.epochs: must be >= 1"),
        (["--space", str(good), "--name", "taken"], "sweep 'taken' exists with other settings (space, config"),
    ]
    for args, fragment in cases:
        code = run_cli("megl_ray.tune", tune.main, [*args, *base])
        out, err = capsys.readouterr()
        assert code == 2, err[-2000:]
        assert fragment in err and err.startswith("megl_ray.tune: error: "), err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert json.loads(out.strip().splitlines()[-1])["error"]


def test_concurrency_fits_the_cluster():
    from megl_ray.tuning.sweep import max_concurrent_trials

    one = load_config(TINY)
    two = load_config(TINY, ["train.num_workers=2"])
    assert max_concurrent_trials({"CPU": 2.0}, one, use_gpu=False) == 2  # 0.5 CPU each, 1 CPU kept for Ray Data
    assert max_concurrent_trials({"CPU": 8.0}, one, use_gpu=False) == 14
    assert max_concurrent_trials({"CPU": 8.0}, two, use_gpu=False) == 7
    assert max_concurrent_trials({"CPU": 2.0}, two, use_gpu=False) == 1
    assert max_concurrent_trials({"CPU": 1.5}, two, use_gpu=False) == 1  # never 0: such a sweep fails to start
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 8.0}, two, use_gpu=True) == 4
    assert max_concurrent_trials({"CPU": 64.0, "GPU": 1.0}, two, use_gpu=True) == 1


def test_asha_rungs_survive_a_restart(tmp_path):
    from types import SimpleNamespace

    from megl_ray.tuning.hooks import ResumableASHA

    def asha():
        return ResumableASHA(
            str(tmp_path / "asha_state.yaml"),
            time_attr="epoch",
            max_t=4,
            grace_period=1,
            reduction_factor=2,
            metric="val_accuracy",
            mode="max",
        )

    first, good = asha(), SimpleNamespace(trial_id="t_00000")
    first.on_trial_add(None, good)
    assert first.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.8}) == "CONTINUE"
    assert first.on_trial_result(None, good, {"epoch": 2, "val_accuracy": 0.9}) == "CONTINUE"
    restarted, bad = asha(), SimpleNamespace(trial_id="t_00001")  # a resumed sweep: a fresh scheduler
    restarted.on_trial_add(None, bad)
    assert restarted.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.1}) == "STOP"
    fresh = ResumableASHA(
        str(tmp_path / "other.yaml"),
        time_attr="epoch",
        max_t=4,
        grace_period=1,
        reduction_factor=2,
        metric="val_accuracy",
        mode="max",
    )
    fresh.on_trial_add(None, bad)
    assert fresh.on_trial_result(None, bad, {"epoch": 1, "val_accuracy": 0.1}) == "CONTINUE"  # nobody to beat


def test_a_trial_must_leave_a_cpu_to_ray_data():
    from megl_ray.errors import UserError
    from megl_ray.tuning.sweep import check_cpus

    check_cpus({"CPU": 2.0}, load_config(TINY, ["train.num_workers=2"]))
    with pytest.raises(UserError, match="train.num_workers=3 needs 1.5 CPUs plus 1 for data, the cluster has 2"):
        check_cpus({"CPU": 2.0}, load_config(TINY, ["train.num_workers=3"]))


def test_asha_lets_a_trial_in_its_last_epoch_finish_by_itself(tmp_path):
    """A STOP at max_t would kill the trial's driver inside fit(), before it writes result.json and closes its
    tracking run: the last epoch is recorded on its rung but always continues."""
    from types import SimpleNamespace

    from megl_ray.tuning.hooks import ResumableASHA

    asha = ResumableASHA(
        str(tmp_path / "asha_state.yaml"),
        time_attr="epoch",
        max_t=2,
        grace_period=1,
        reduction_factor=2,
        metric="val_accuracy",
        mode="max",
    )
    good, worse = SimpleNamespace(trial_id="t_00000"), SimpleNamespace(trial_id="t_00001")
    for trial in (good, worse):
        asha.on_trial_add(None, trial)
    assert asha.on_trial_result(None, good, {"epoch": 1, "val_accuracy": 0.5}) == "CONTINUE"
    assert asha.on_trial_result(None, good, {"epoch": 2, "val_accuracy": 0.9}) == "CONTINUE"
    assert asha.on_trial_result(None, worse, {"epoch": 1, "val_accuracy": 0.6}) == "CONTINUE"
    assert asha.on_trial_result(None, worse, {"epoch": 2, "val_accuracy": 0.1}) == "CONTINUE"  # below the cutoff
    rung_2 = dict(asha._brackets[0]._rungs)[2]
    assert rung_2 == {"t_00000": 0.9, "t_00001": 0.1}

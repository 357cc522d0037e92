"""End-to-end tests of ``python -m megl_ray.tune``: Ray Tune over Ray Train runs of the tiny preset, on 2 cores.

One sweep serves the slow tests (each trial costs a Train run): two trials of a learning-rate grid, one good and
one hopeless (lr 1e-9), run one at a time so that the good one reports first (2 cores would fit two). The first run is
interrupted by a test hook once the good trial has finished; re-running the same command resumes the sweep, whose
ASHA — restored with the good trial's results — stops the hopeless trial after its first epoch. (Shortened from
three trials, two of them hopeless: the second hopeless trial proved nothing the first does not — a trial stopped at
the first rung against the restored results — and cost a Train run.)
"""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.config import MEGLConfig, load_config
from megl_ray.data.reader import bundled_dataset_uri
from megl_ray.training.local import train
from tests.support.subprocess_env import ISOLATED, subprocess_env
from tests.support.tracking_support import mlflow_server

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "configs" / "tune-tiny.yaml"
GOOD, BAD = 3e-3, (1e-9,)
RUNS = "s3://megl/runs"  # the embedded default's run storage


def _run(module, args, **env):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=subprocess_env(ISOLATED, **env),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc.returncode, proc.stdout, proc.stderr


SECRET = "megl-tune-Distinctive-secret-7d2a10"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The sweep, run (and resumed) on the embedded default with a distinctive ``MEGL_S3_SECRET_KEY``: the
    experiment, its trials' runs and Tune's state live on the embedded store, copied here afterwards."""
    root = tmp_path_factory.mktemp("sweep")
    space = root / "lr.yaml"
    space.write_text(f"optim.lr: {{grid: [{GOOD}, {BAD[0]}]}}\n")
    (root / "mlflow").mkdir()
    home = root / "home"
    env = {"MEGL_HOME": str(home), "MEGL_S3_SECRET_KEY": SECRET}
    ray_before = set(Path("/tmp").glob("ray*"))
    with mlflow_server(root / "mlflow") as mlflow_uri:  # every trial is tracked too: one experiment, a run each
        args = [
            "--space",
            str(space),
            "--config",
            str(TINY),
            "--name",
            "lr",
            "--metric",
            "loss",
            "--max-concurrent",
            "1",
            f"data.uri={bundled_dataset_uri()}",
            f"train.sample_log_dir={root / 'samples'}",
            "run.tracking=mlflow",
            f"run.tracking_uri={mlflow_uri}",
        ]
        first = _run("megl_ray.tune", args, MEGL_TEST_TUNE_INTERRUPT_AFTER="1", **env)
        with storage.EmbeddedS3(home / "embedded_s3", secret_key=SECRET) as server:
            first_results = json.loads(storage.read_bytes(f"{RUNS}/lr/results.json", server.options))
        second = _run("megl_ray.tune", args, **env)
        with storage.EmbeddedS3(home / "embedded_s3", secret_key=SECRET) as server:
            storage.download(f"{RUNS}/lr", root / "experiment", server.options)
            objects = storage.list_files("s3://megl/", server.options)
            leaks = [o for o in objects if SECRET.encode() in storage.read_bytes(o, server.options)]
        yield {
            "root": root,
            "home": home,
            "first": first,
            "first_results": first_results,
            "second": second,
            "experiment": root / "experiment",
            "mlflow": mlflow_uri,
            "objects": objects,
            "leaks": leaks,
            "ray_dirs": set(Path("/tmp").glob("ray*")) - ray_before,
        }


def _result(run):
    code, out, err = run
    assert code == 0, err[-5000:]
    return json.loads(out.strip().splitlines()[-1])


def _rows(sweep):
    with open(sweep["experiment"] / "results.csv") as f:
        return {float(r["optim.lr"]): r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_a_sweep_reports_a_table_csv_json_and_a_best_config_that_trains(sweep):
    result = _result(sweep["second"])
    experiment = sweep["experiment"]
    assert result["trials"] == 2 and result["unfinished"] == 0 and result["errored"] == 0
    assert (
        result["results_csv"] == f"{RUNS}/lr/results.csv" and result["best_config_uri"] == f"{RUNS}/lr/best_config.yaml"
    )
    # the experiment is on S3; --config takes a local file: a copy of the best config is kept on this machine
    assert result["best_config"] == str(sweep["home"] / "sweeps" / "lr" / "best_config.yaml")
    assert Path(result["best_config"]).read_bytes() == (experiment / "best_config.yaml").read_bytes()
    assert result["best_values"] == {"optim.lr": GOOD} and result["best_metric"] > 0

    rows = _rows(sweep)
    assert set(rows) == {GOOD, *BAD}
    assert list(next(iter(rows.values()))) == ["trial", "optim.lr", "loss", "epochs", "status", "run"]
    assert float(rows[GOOD]["loss"]) == pytest.approx(result["best_metric"])
    assert all(
        r["run"] == f"{RUNS}/lr-{r['trial']}" and "_" in r["trial"] for r in rows.values()
    )  # <sweep>-<trial id>: no timestamps
    saved = json.loads((experiment / "results.json").read_text())
    assert saved["best_trial"] == rows[GOOD]["trial"] and len(saved["rows"]) == 2
    err = sweep["second"][2]
    table = err[err.index("sweep lr: 2 trial(s)") :]
    assert "trial" in table and "optim.lr" in table and "early-stopped" in table and "completed" in table

    best = load_config(experiment / "best_config.yaml")
    assert isinstance(best, MEGLConfig) and best.optim.lr == GOOD and best.run.name == "lr-best"
    assert best.train.num_workers == 1 and best.data.uri == bundled_dataset_uri()
    # The file is a complete config that trains as it stands: through the one-process trainer (the same config
    # loader as ``python -m megl_ray.train --config``; a Ray Train run of it is every other e2e test), 3 steps.
    trained = train(best, max_steps=3)
    assert trained["steps"] == 3 and math.isfinite(trained["final"]["loss"])


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_experiment_with_a_run_per_trial(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sweep["mlflow"])
    experiment = client.get_experiment_by_name("lr")
    runs = client.search_runs([experiment.experiment_id])
    rows = _rows(sweep)
    assert sorted(r.info.run_name for r in runs) == sorted(f"lr-{r['trial']}" for r in rows.values())
    assert sorted(float(r.data.params["optim.lr"]) for r in runs) == sorted([GOOD, *BAD])
    good = next(r for r in runs if float(r.data.params["optim.lr"]) == GOOD)
    assert good.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(good.info.run_id, "val/accuracy")] == [9, 18]  # per epoch


@pytest.mark.slow
def test_asha_stops_the_hopeless_trial_after_its_first_epoch(sweep):
    rows = _rows(sweep)
    assert rows[GOOD]["status"] == "completed" and rows[GOOD]["epochs"] == "2"
    for lr in BAD:
        assert rows[lr]["status"] == "early-stopped" and rows[lr]["epochs"] == "1", rows[lr]
        assert float(rows[lr]["loss"]) > float(rows[GOOD]["loss"])
    assert _result(sweep["second"])["early_stopped"] == 1


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_its_finished_trial(sweep):
    code, out, err = sweep["first"]
    assert code == 130 and "interrupted" in err and "re-run the same command to resume" in err, err[-3000:]
    first = sweep["first_results"]
    assert first["completed"] == 1 and first["unfinished"] == 1
    assert _result(sweep["second"])["resumed"] is True

    good = _rows(sweep)[GOOD]["trial"]
    steps = [
        json.loads(line) for line in (sweep["root"] / "samples" / good / "samples-rank0.jsonl").read_text().splitlines()
    ]
    assert [s["step"] for s in steps] == list(range(1, 19)), "the finished trial was trained again"
    assert {s["start_step"] for s in steps} == {0}
    progress = (sweep["experiment"] / good / "progress.csv").read_text().strip().splitlines()
    assert len(progress) == 1 + 2, progress  # its two epochs, reported once
    trial_dirs = [p.name for p in sweep["experiment"].iterdir() if p.is_dir()]
    assert sorted(trial_dirs) == sorted(r["trial"] for r in _rows(sweep).values())


@pytest.mark.slow
def test_the_secret_key_is_in_no_stored_object_and_no_ray_temp_file(sweep):
    """Tune pickles the trainable with its parameters (environment included) into its experiment state on S3: the
    sweep's trials inherit the embedded store's credentials, and none of them is stored — nor written by Ray."""
    assert any("tuner.pkl" in o for o in sweep["objects"]) and any("/checkpoint_" in o for o in sweep["objects"])
    assert not sweep["leaks"], sweep["leaks"]
    assert sweep["ray_dirs"]
    leaks = [str(f) for d in sweep["ray_dirs"] for f in d.rglob("*") if _holds(f, SECRET.encode())]
    assert not leaks, leaks
    assert not list((sweep["home"] / "credentials").glob("*")), "a credentials file outlived its sweep"


def _holds(path: Path, needle: bytes) -> bool:
    try:
        return path.is_file() and not path.is_symlink() and needle in path.read_bytes()
    except OSError:  # sockets, files removed meanwhile
        return False

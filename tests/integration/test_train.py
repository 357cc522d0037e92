"""End-to-end tests of ``python -m megl_ray.train``: Ray Train + DeepSpeed on a real local Ray, 2 CPU workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from megl_ray import storage, train, tune
from megl_ray.cli import run_cli
from megl_ray.data import convert
from megl_ray.data.reader import bundled_dataset_uri, read_split
from megl_ray.data.sample import sample_dataset_path
from megl_ray.storage.embedded_home import embedded_store_for
from tests.support.subprocess_env import ISOLATED, subprocess_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
FAST = REPO / "tests" / "configs" / "tiny-fast.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "megl-i10-Distinctive-secret-4f1c9e"


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """One training run as a cluster user starts it: ``ray job submit`` of ``python -m megl_ray.train`` without a
    run name, to a ``ray start`` cluster of its own, on the embedded default (a distinctive ``MEGL_S3_SECRET_KEY``)
    with a dataset of train and test only (so validation is carved from train). The tests below read it, re-run it
    and sweep beside it, then look for the secret at rest."""
    root = tmp_path_factory.mktemp("submitted")
    home, data = root / "home", root / "train-test"
    assert run_cli("convert", convert.main, [str(sample_dataset_path()), str(data), "--val-fraction", "0"]) == 0
    ray_before = _ray_temp_dirs()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    dash = _free_port()
    # RAY_AUTH_MODE=token: the client then sends ~/.ray/auth_token
    env = subprocess_env(ISOLATED, MEGL_HOME=str(home), RAY_AUTH_MODE="token", MEGL_S3_SECRET_KEY=SECRET)
    ray_bin = str(Path(sys.executable).parent / "ray")
    # In a session of its own: its process group holds this Ray's processes (and the job's), and only they are
    # killed at the end (`ray stop` would stop every Ray instance on the machine).
    start = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus=2",
            f"--temp-dir={temp}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            f"--port={_free_port()}",
            "--include-dashboard=true",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert start.wait(timeout=300) == 0, start.stdout.read().decode()[-3000:]
    try:
        for _ in range(20):  # `ray start` returns before the job agent is up; Ray's own answer says to retry
            job = subprocess.run(
                [
                    ray_bin,
                    "job",
                    "submit",
                    f"--address=http://127.0.0.1:{dash}",
                    "--",
                    "python",
                    "-m",
                    "megl_ray.train",
                    "--config",
                    str(FAST),
                    f"data.uri={data}",
                ],
                env=env,
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=900,
            )
            if "No available agent to submit job" not in job.stderr:
                break
            time.sleep(5)
    finally:
        os.killpg(start.pid, signal.SIGKILL)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    result = json.loads([line for line in job.stdout.splitlines() if line.startswith('{"checkpoint"')][-1])
    return {"home": home, "data": data, "job": job, "result": result, "ray_before": ray_before}


def test_ray_job_submit_runs_the_trainer_and_leaves_checkpoints_in_the_embedded_s3(submitted, monkeypatch):
    job, result, home = submitted["job"], submitted["result"], submitted["home"]
    assert "succeeded" in job.stdout + job.stderr
    assert result["steps"] == result["planned_steps"] > 0
    name = result["run_dir"].rsplit("/", 1)[1]
    assert result["run_dir"] == f"s3://megl/runs/{name}" and name.startswith("megl-")  # no run.name: a fresh one
    assert result["checkpoint"].startswith(f"s3://megl/runs/{name}/checkpoint_")
    # a dataset without a val split: validation on data.val_fraction of train
    assert result["val_source"] == "carved" and result["val_fraction"] == 0.1 and result["val_accuracy"] is not None
    # the run's last lines are the commands that evaluate and explain it
    assert f"python -m megl_ray.evaluate --checkpoint s3://megl/runs/{name}/export" in job.stdout + job.stderr
    assert f"python -m megl_ray.explain --checkpoint s3://megl/runs/{name}/export" in job.stdout + job.stderr
    with storage.EmbeddedS3(home / "embedded_s3", secret_key=SECRET) as server:  # the job's server is gone
        files = storage.list_files(result["run_dir"], server.options)
    checkpoint_files = [f for f in files if "/checkpoint_" in f]
    assert any(f.endswith("train_state.json") for f in checkpoint_files)
    assert any("/megl/" in f for f in checkpoint_files)  # the DeepSpeed tag directory with the shards
    assert any(f.endswith("/export/model.safetensors") for f in files)
    assert any(f.endswith("/result.json") for f in files)
    for var in ISOLATED:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEGL_HOME", str(home))
    monkeypatch.setenv("MEGL_S3_SECRET_KEY", SECRET)
    with embedded_store_for(result["export"]):  # what the printed commands rely on: the store served again
        assert storage.exists(result["export"] + "/model.safetensors")


def _run_train(args, capsys):

    code = run_cli("megl_ray.train", train.main, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_killed_worker_resumes_with_exact_accumulation_steps_and_samples(tmp_path, capsys, monkeypatch):
    """grad_accum=2: a kill mid-epoch 2 (step 7; last checkpoint step 6) and one during the validation that follows
    the checkpoint on the run's last step (9): exact steps and samples, and no crash loop on the empty epoch."""
    data = bundled_dataset_uri()
    marker = tmp_path / "killed"
    samples = tmp_path / "samples"
    monkeypatch.setenv("MEGL_TEST_KILL_AT_STEP", "7,9@validation")
    monkeypatch.setenv("MEGL_TEST_KILL_MARKER", str(marker))
    code, out, err = _run_train(
        [
            "--config",
            str(FAST),
            f"data.uri={data}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.name=fault",
            "train.epochs=2",
            "train.grad_accum=2",
            "train.checkpoint_every=3",
            f"train.sample_log_dir={samples}",
        ],
        capsys,
    )
    assert code == 0, err[-4000:]
    assert marker.exists() and Path(f"{marker}.1").exists(), "a fault was never injected"
    assert "replays other samples" not in err  # the resumed epoch replayed the original order exactly
    result = json.loads(out.strip().splitlines()[-1])
    # 272 images, 2 workers × 16 → 9 micro-batches per epoch, 18 in all → 9 optimizer steps
    assert result["steps"] == result["planned_steps"] == 9

    rows = [json.loads(line) for f in sorted(samples.glob("*.jsonl")) for line in f.read_text().splitlines()]
    starts = sorted({r["start_step"] for r in rows})
    assert starts == [0, 6], starts  # the second resume (step 9) had nothing left to train
    first, resumed = [r for r in rows if r["start_step"] == 0], [r for r in rows if r["start_step"] == 6]
    # what is in the final weights: the first attempt up to the checkpoint, then the resumed attempt
    kept = [r for r in first if r["step"] <= 6] + resumed
    per_step = Counter((r["rank"], r["step"]) for r in kept)
    assert per_step == {(rank, step): 2 for rank in (0, 1) for step in range(1, 10)}, per_step
    before = [i for r in first if r["epoch"] == 1 and r["step"] <= 6 for i in r["ids"]]
    after = [i for r in resumed for i in r["ids"]]
    assert {r["epoch"] for r in resumed} == {1} and before and after
    assert len(after) == len(set(after)), "a sample was trained twice after the resume"
    assert not set(before) & set(after), "a sample trained before the checkpoint was trained again"
    train_ids = set(read_split(data, "train").column("id").to_pylist())
    assert set(before) | set(after) == train_ids, "samples were missed in the resumed epoch"
    states = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "fault").glob("checkpoint_*/train_state.json")]
    assert states and all(s["micro_steps"] == 2 * s["step"] for s in states), "checkpoint inside a window"
    assert result["val_accuracy"] is not None

    # the trainer's export is what evaluation reads: every documented metric comes out
    from megl_ray import evaluate

    code = run_cli(
        "megl_ray.evaluate",
        evaluate.main,
        ["--checkpoint", result["export"], "--data", data, "--workers", "1", "--max-new-tokens", "8"],
    )
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    metrics = json.loads(out.strip().splitlines()[-1])
    for key in (
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "auc",
        "miou",
        "pointing_game",
        "bleu4",
        "meteor",
        "rouge_l",
        "cider",
        "text_similarity",
    ):
        assert key in metrics, key
    assert metrics["accuracy"] == pytest.approx(result["test_accuracy"], abs=1e-4)

    # any checkpoint the run kept exports on its own (DeepSpeed's fp32 masters, consolidated over both ranks'
    # partitions); the last holds the final weights: the run's own export, tensor for tensor
    from safetensors.torch import load_file

    from megl_ray import export

    argv = ["--from-checkpoint", result["checkpoint"], str(tmp_path / "from-checkpoint")]
    assert run_cli("megl_ray.export", export.main, argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["step"] == 9, err[-3000:]
    ours = load_file(str(Path(result["export"]) / "model.safetensors"))
    theirs = load_file(str(tmp_path / "from-checkpoint" / "model.safetensors"))
    assert set(ours) == set(theirs)
    assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-6) for k in ours), "weights differ"


SECRET = "megl-i10-Distinctive-secret-4f1c9e"


def _ray_temp_dirs():
    return set(Path("/tmp").glob("ray*"))


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:  # sockets, files removed meanwhile
            pass
    return hits


def test_re_runs_leave_no_secret_at_rest(submitted, capsys, monkeypatch):
    """On the submitted run's store (its distinctive MEGL_S3_SECRET_KEY): its re-run by name is complete (no
    training), a changed loss weight under its name stops, a sweep whose metric needs validation the data lacks is
    refused; then the secret is in no stored object and no file of the job's Ray temp dir, and no credentials file
    outlived its run. (A sweep's stored state, tuner.pkl, is checked the same way in test_tune.py.)"""
    for var in ISOLATED:
        monkeypatch.delenv(var, raising=False)
    home, data, result = submitted["home"], submitted["data"], submitted["result"]
    monkeypatch.setenv("MEGL_HOME", str(home))
    monkeypatch.setenv("MEGL_S3_SECRET_KEY", SECRET)
    name = result["run_dir"].rsplit("/", 1)[1]

    code, out, err = _run_train(["--config", str(FAST), f"data.uri={data}", f"run.name={name}"], capsys)
    assert code == 0 and f"run {name} is complete" in err and "[megl] epoch" not in err, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == result

    code, out, err = _run_train(
        ["--config", str(FAST), f"data.uri={data}", f"run.name={name}", "loss.text_weight=0.5"], capsys
    )
    assert code == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if "error" in x][-1]
    assert "loss.text_weight differs" in line and "run.name=" in line, err[-2000:]

    space = home.parent / "space.yaml"
    space.write_text("optim.lr: {grid: [0.003]}\n")
    sweep = [
        "--space",
        str(space),
        "--config",
        str(FAST),
        "--name",
        "s",
        "--scheduler",
        "fifo",
        f"data.uri={data}",
        "data.val_fraction=0",
    ]
    code = run_cli("megl_ray.tune", tune.main, sweep)  # the default metric needs validation
    assert code == 2 and "data.val_fraction=0" in capsys.readouterr().err

    with storage.EmbeddedS3(home / "embedded_s3", secret_key=SECRET) as server:
        objects = storage.list_files("s3://megl/", server.options)
        assert any("/checkpoint_" in o for o in objects) and any("/export/" in o for o in objects)
        leaks = [o for o in objects if SECRET.encode() in storage.read_bytes(o, server.options)]
    assert not leaks, leaks
    ray_dirs = _ray_temp_dirs() - submitted["ray_before"]
    assert ray_dirs  # the job's cluster
    leaks = [f for d in ray_dirs for f in _files_holding(d, SECRET.encode())]
    assert not leaks, leaks
    assert not list((home / "credentials").glob("*")), "a credentials file outlived its run"

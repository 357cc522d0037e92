"""One ``$MEGL_HOME``, many processes (``megl_ray.storage.shared_store``): the embedded store shared by whoever needs
it, outliving the process that started it, stopped by the last user to leave; and what an interrupted run says.

The slow test is a workstation session: a process starts the store and puts an earlier run's export in it; two
no-argument runs start 2 s apart; ``evaluate`` of the earlier export runs while they train; the process that started
the store is SIGKILLed; one run is interrupted with Ctrl-C mid-epoch and resumed with the command it printed; both
runs end with exact accounting, and afterwards no server, keeper or Ray process is left and the store (started again
on the same data) serves everything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.data.reader import read_split
from megl_ray.driver.embedded import bundled_dataset_s3_uri
from megl_ray.storage import EmbeddedS3
from megl_ray.storage.embedded import EMBEDDED_ACCESS_KEY, EMBEDDED_SECRET_KEY_DEFAULT, server_options
from megl_ray.storage.shared_store import STATE_FILE, alive, read_state
from tests.support.subprocess_env import subprocess_env

REPO = Path(__file__).resolve().parents[2]
FAST = REPO / "tests" / "configs" / "tiny-fast.yaml"

HOLDER = """
import sys, time
from pathlib import Path
from megl_ray import storage
from megl_ray.config import megl_home
from megl_ray.storage.embedded_home import serving
with serving(megl_home() / "embedded_s3") as store:
    if len(sys.argv) > 1:
        storage.ensure_bucket("s3://megl/runs")
        storage.upload(sys.argv[1], "s3://megl/runs/earlier/export")
    print(store.endpoint_url, flush=True)
    time.sleep(3600)
"""


def _holder(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], str]:
    """A process that joins (or starts) the store, optionally uploads, prints the endpoint and waits."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("http://127.0.0.1:"), proc.stderr.read()[-3000:] if proc.poll() is not None else line
    return proc, line


def _weed_processes(data_dir: Path) -> list[int]:
    """Pids of SeaweedFS servers or keepers working on ``data_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(data_dir) in command and ("weed" in command or "megl_ray.storage.keeper" in command):
                found.append(int(entry.name))
    return found


def _options(endpoint: str) -> storage.S3Options:
    return server_options(endpoint, EMBEDDED_ACCESS_KEY, EMBEDDED_SECRET_KEY_DEFAULT)


def _gone(data_dir: Path, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while _weed_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _weed_processes(data_dir)


def test_the_store_outlives_its_starter_and_stops_with_its_last_user(tmp_path):
    """Two processes share one server; the one that started it is SIGKILLed and the other keeps reading and
    writing; when the last one leaves (Ctrl-C) it stops the server before it exits; a store.json left by a dead
    keeper is replaced without a word, every object intact; a last user that crashes leaves nothing running
    either (the keeper reclaims its lease)."""
    env = subprocess_env(("RAY_ADDRESS",), MEGL_HOME=str(tmp_path / "home"))
    data_dir = tmp_path / "home" / "embedded_s3"
    first, endpoint = _holder(env)
    second, joined = _holder(env)
    assert joined == endpoint and len(list((data_dir / "leases").iterdir())) == 2
    keeper = read_state(data_dir)["keeper_pid"]
    first.kill()  # the starter
    first.wait()
    options = _options(endpoint)
    storage.ensure_bucket("s3://megl", options)
    storage.write_bytes("s3://megl/kept.txt", b"still here", options)
    assert alive(keeper) and storage.read_bytes("s3://megl/kept.txt", options) == b"still here"
    second.send_signal(signal.SIGINT)  # the last user leaves: it stops the keeper and waits for it
    second.wait(timeout=60)
    assert not _weed_processes(data_dir) and not (data_dir / STATE_FILE).exists()
    (data_dir / STATE_FILE).write_text(json.dumps({"endpoint_url": "http://127.0.0.1:9", "keeper_pid": 2**22 + 7}))
    third, again = _holder(env)
    assert storage.read_bytes("s3://megl/kept.txt", _options(again)) == b"still here"
    third.kill()  # the last user crashes
    third.wait()
    assert _gone(data_dir, within_s=30)


def test_a_zombie_is_not_alive():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it exits
    deadline = time.monotonic() + 60
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not alive(proc.pid) and alive(os.getpid())
    proc.wait()


def _samples(path: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(path.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.fixture
def reaped():
    """Processes a test starts, killed at its end whatever happened (a failed test must not leave a store up)."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_two_runs_an_evaluation_a_killed_starter_and_a_ctrl_c_share_one_megl_home(tmp_path, export, data_uri, reaped):
    home = tmp_path / "home"
    data_dir = home / "embedded_s3"
    env = subprocess_env(("RAY_ADDRESS", "MEGL_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
                         MEGL_HOME=str(home))  # fmt: skip
    starter, _ = _holder(env, export)  # starts the store; an earlier run's export goes into it
    reaped.append(starter)

    def train(name: str, epochs: int = 1) -> subprocess.Popen[str]:
        args = ["--config", str(FAST), f"run.name={name}", "train.checkpoint_every=3", f"train.epochs={epochs}"]
        args.append(f"train.sample_log_dir={tmp_path / name}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "megl_ray.train", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reaped.append(proc)
        return proc

    # run one trains 4 epochs (36 steps): still training after two's Ctrl-C, its shutdown (up to 60 s) and the
    # starter's death; at one epoch it once finished before that (a race lost in CI)
    one = train("one", epochs=4)
    time.sleep(2)
    two = train("two")
    # Ctrl-C of run "two" in its first epoch, after its step-3 checkpoint (and the 2 s Ray Train takes to see it)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and two.poll() is None:
        rows = _samples(tmp_path / "two") if (tmp_path / "two").is_dir() else []
        if any(r["step"] >= 4 for r in rows):
            break
        time.sleep(0.5)
    time.sleep(3)
    assert two.poll() is None, two.stderr.read()[-3000:]
    interrupted_at = time.monotonic()
    two.send_signal(signal.SIGINT)
    _, err = two.communicate(timeout=120)
    assert two.returncode == 130 and time.monotonic() - interrupted_at < 60, err[-3000:]
    lines = err.strip().splitlines()
    stated = re.match(r"\[megl\] run two interrupted \(SIGINT\); its last checkpoint is at step (\d+) ", lines[-2])
    assert stated, lines[-4:]
    command = lines[-1].removeprefix("[megl] resume it with: ")
    assert command.startswith("python -m megl_ray.train --config ") and "run.name=two" in command
    assert one.poll() is None, one.stderr.read()[-3000:]
    starter.kill()  # the process that started the store dies; the runs go on
    starter.wait()
    # resumed with exactly that command (python: this venv's), while run one still trains
    resumed = subprocess.Popen(
        [sys.executable, *command.split()[1:]], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    reaped.append(resumed)
    # while they train: evaluate the earlier export, from the store
    assert one.poll() is None, one.stderr.read()[-3000:]
    evaluated = subprocess.run(
        [sys.executable, "-m", "megl_ray.evaluate", "--checkpoint", "s3://megl/runs/earlier/export", "--data",
         bundled_dataset_s3_uri(), "--workers", "1", "--max-new-tokens", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert 0 <= json.loads(evaluated.stdout.strip().splitlines()[-1])["accuracy"] <= 1
    out_two, err_two = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, err_two[-3000:]
    out_one, err_one = one.communicate(timeout=900)
    assert one.returncode == 0, err_one[-3000:]
    for name, out in (("one", out_one), ("two", out_two)):
        result = json.loads(out.strip().splitlines()[-1])
        assert result["steps"] == result["planned_steps"] and result["run_dir"] == f"s3://megl/runs/{name}"
    # run two's final weights: the interrupted attempt up to the checkpoint it resumed from, then the resumed attempt
    # — no sample twice, none missed (what the interrupted attempt's first step saw plus the rest: the epoch)
    rows = _samples(tmp_path / "two")
    start = max(r["start_step"] for r in rows)
    assert start == int(stated.group(1)) > 0  # resumed where the line said
    before = [i for r in rows if r["start_step"] == 0 and r["step"] <= start for i in r["ids"]]
    after = [i for r in rows if r["start_step"] == start for i in r["ids"]]
    assert before and after and not set(before) & set(after) and len(after) == len(set(after))
    # the run's data is the bundled sample uploaded to the store: converted exactly as the suite's local copy
    assert set(before) | set(after) == set(read_split(data_uri, "train").column("id").to_pylist())
    # afterwards: no server, keeper or Ray process of this MEGL_HOME; the store, started again, serves all three
    assert _gone(data_dir, within_s=30)
    assert not _ray_processes(str(home)), _ray_processes(str(home))
    with EmbeddedS3(data_dir) as server:
        for run in ("one", "two", "earlier"):
            assert storage.exists(f"s3://megl/runs/{run}/export/meta.json", server.options), run
        for run in ("one", "two"):
            kept = json.loads(storage.read_bytes(f"s3://megl/runs/{run}/result.json", server.options))
            assert kept["steps"] == kept["planned_steps"], run


def _ray_processes(marker: str) -> list[str]:
    """Command lines of Ray's processes (raylet, GCS, workers) whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in environ and any(k in command for k in ("raylet", "gcs_server", "ray::", "default_worker")):
            found.append(command[:200])
    return found

"""``python -m megl_ray.train``'s user errors are one clear line each, exit 2, before Ray starts: an unknown config
key, a model directory that is not there, unreachable storage (bounded retries). A cluster too small for the run is
the one user error that needs Ray: ``tests/integration/test_tracking.py::test_verbose_brings_back_rays_own_logs``."""

import json
import socket
import time
from pathlib import Path

from megl_ray import train
from megl_ray.cli import run_cli
from megl_ray.data.reader import bundled_dataset_uri
from megl_ray.driver import fit

FAST = Path(__file__).resolve().parents[1] / "configs" / "tiny-fast.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_train(args, capsys):
    code = run_cli("megl_ray.train", train.main, args)
    out, err = capsys.readouterr()
    return code, out, err


def test_user_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the user error was found")

    monkeypatch.setattr(fit, "start_ray", no_ray)
    data = bundled_dataset_uri()
    cases = [
        (["model.nonsense=1"], "unknown config key 'model.nonsense'"),
        (
            [
                "model.preset=llava",
                f"model.vlm_path={tmp_path / 'missing'}",
                f"data.uri={data}",
                f"run.storage_path={tmp_path}",
            ],
            "model directory not found",
        ),
    ]
    for args, fragment in cases:
        code, out, err = _run_train(["--config", str(FAST), *args], capsys)
        assert code == 2 and fragment in err, err[-2000:]
        assert "Traceback" not in err
        assert json.loads(out.strip().splitlines()[-1])["error"]
    monkeypatch.setenv("MEGL_S3_ENDPOINT", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setenv("MEGL_S3_RETRY_SECONDS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    start = time.monotonic()
    code, out, err = _run_train(
        ["--config", str(FAST), "data.uri=s3://nowhere/ds", f"run.storage_path={tmp_path}"], capsys
    )
    assert code == 2 and "storage unreachable" in err and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - start < 120

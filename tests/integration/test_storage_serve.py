"""megl_ray.storage.serve: ``python -m megl_ray.storage serve`` end to end (slow) and its help."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megl_ray import storage
from megl_ray.storage import S3Options
from tests.support.storage_support import LEAK_SECRET, REPO, read_line


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_serve_cli(tmp_path):
    data_dir = tmp_path / "served"
    env = {**os.environ, "PYTHONPATH": str(REPO), storage.EMBEDDED_SECRET_ENV: LEAK_SECRET}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megl_ray.storage", "serve", "--data-dir", str(data_dir)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        info = json.loads(read_line(proc.stdout, 45))
        assert set(info) == {"endpoint_url", "data_dir", "access_key"}
        assert info["data_dir"] == str(data_dir.resolve()) and info["access_key"] == "megl"
        options = S3Options(endpoint_url=info["endpoint_url"], access_key="megl", secret_key=LEAK_SECRET)
        storage.ensure_bucket("s3://t-serve", options)
        storage.write_bytes("s3://t-serve/x", b"served", options)
        assert storage.read_bytes("s3://t-serve/x", options) == b"served"
        weed_pid = int((data_dir / "weed.pid").read_text())

        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    assert result["stopped"] is True and result["signal"] == "SIGTERM"
    assert LEAK_SECRET not in stdout.decode() and LEAK_SECRET not in stderr.decode()
    assert not Path(f"/proc/{weed_pid}").exists()  # weed was reaped, not orphaned
    assert not (data_dir / "weed.pid").exists()


def test_serve_help_names_the_secret_variable(capsys):
    with pytest.raises(SystemExit) as info:
        storage.main(["serve", "--help"])
    assert info.value.code == 0
    assert storage.EMBEDDED_SECRET_ENV in " ".join(capsys.readouterr().out.split())

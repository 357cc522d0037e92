"""megl_ray.reporting.console: which of Ray's forwarded lines are dropped (routine ones only) and that the filter wraps
Ray's printer without losing anything else. Lines below were printed by a real 2-worker run of the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_bad_flag_is_one_line_and_exit_2_for_every_cli(capsys):
    import importlib

    from megl_ray.cli import run_cli

    for module in (
        "megl_ray.train",
        "megl_ray.train_local",
        "megl_ray.tune",
        "megl_ray.storage",
        "megl_ray.data.make_sample",
        "megl_ray.data.convert",
        "megl_ray.evaluate",
        "megl_ray.explain",
    ):
        code = run_cli(module, importlib.import_module(module).main, ["--no-such-flag"])
        out, err = capsys.readouterr()
        assert code == 2, (module, err[-2000:])
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and err.startswith(module), module
        assert out.strip().splitlines()[-1].startswith('{"error": '), module
    # and through a real ``python -m`` entry point (the storage package's __main__)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "megl_ray.storage", "serve", "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr

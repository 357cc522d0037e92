"""Running a ``bench/`` script as a user does: a subprocess with this checkout on PYTHONPATH, exit 0, and its
result as one JSON object on the last stdout line."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: str, timeout: int = 900) -> tuple[dict[str, Any], str]:
    """(the last stdout line as JSON, stderr) of ``python bench/<name>.py ARGS``; asserts it exited 0."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr

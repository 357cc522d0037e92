"""``bench/efficiency.py`` runs end to end on CPU at tiny shapes (a GPU run at MEGL-R18 shapes is the same code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_efficiency_bench_smoke_on_cpu():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "efficiency.py"), "--device", "cpu", "--tiny",
                          "--batch", "2", "--warmup", "0", "--repeats", "1", "--max-new-tokens", "3"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["tiny"] and result["device"] == "cpu" and result["gpu"] is None and result["batch_sizes"] == [1, 2]
    assert len(result["rows"]) == 4 and all(r["images_per_s"] > 0 for r in result["rows"])
    assert "images/s" in run.stderr

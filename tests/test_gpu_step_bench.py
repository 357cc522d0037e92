"""``bench/gpu_step.py`` runs end to end on CPU at tiny shapes (the GPU figures come from the same code)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_step_bench_smoke_on_cpu():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--device", "cpu", "--tiny",
                          "--steps", "2", "--warmup", "1", "--batch", "2", "--rationale-tokens", "8"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"megl_step_ms", "plain_step_ms", "ds_vs_plain", "tokens_per_s", "peak_mem_gib", "gpu"} <= set(result)
    assert result["gpu"] == "none (cpu)" and result["megl_step_ms"] > 0 and result["plain_step_ms"] > 0
    assert result["ds_vs_plain"] == pytest.approx(result["megl_step_ms"] / result["plain_step_ms"], rel=0.02)
    assert result["final_loss"] == result["final_loss"]  # finite, not NaN

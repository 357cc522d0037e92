"""``bench/gpu_step.py`` runs end to end on CPU at tiny shapes (the GPU figures come from the same code)."""

import pytest

from tests.support.bench_support import run_bench

pytestmark = pytest.mark.slow


def test_gpu_step_bench_smoke_on_cpu():
    result, _ = run_bench(
        "gpu_step",
        "--device",
        "cpu",
        "--tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "2",
        "--rationale-tokens",
        "8",
    )
    assert {"megl_step_ms", "plain_step_ms", "ds_vs_plain", "tokens_per_s", "peak_mem_gib", "gpu"} <= set(result)
    assert result["gpu"] == "none (cpu)" and result["megl_step_ms"] > 0 and result["plain_step_ms"] > 0
    assert result["ds_vs_plain"] == pytest.approx(result["megl_step_ms"] / result["plain_step_ms"], rel=0.02)
    assert result["final_loss"] == result["final_loss"]  # finite, not NaN

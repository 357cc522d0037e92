"""``bench/efficiency.py`` runs end to end on CPU at tiny shapes (a GPU run at MEGL-R18 shapes is the same code)."""

import pytest

from tests.support.bench_support import run_bench

pytestmark = pytest.mark.slow


def test_efficiency_bench_smoke_on_cpu():
    result, stderr = run_bench(
        "efficiency",
        "--device",
        "cpu",
        "--tiny",
        "--batch",
        "2",
        "--warmup",
        "0",
        "--repeats",
        "1",
        "--max-new-tokens",
        "3",
        timeout=600,
    )
    assert result["tiny"] and result["device"] == "cpu" and result["gpu"] is None and result["batch_sizes"] == [1, 2]
    assert len(result["rows"]) == 4 and all(r["images_per_s"] > 0 for r in result["rows"])
    assert "images/s" in stderr

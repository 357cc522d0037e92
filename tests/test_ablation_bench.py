"""``bench/ablation.py`` end to end at toy size: two rows through the real trainer, then its table, chart and JSON."""

import json
from pathlib import Path

import pytest

from tests.bench_support import run_bench

pytestmark = pytest.mark.slow


def test_ablation_trains_each_row_and_writes_its_table_chart_and_json(tmp_path: Path):
    out = tmp_path / "out"
    result, stderr = run_bench("ablation", "--rows", "ce,megl_cf", "--seeds", "1", "--n-per-class", "10",
                               "--out", str(out), "--work", str(tmp_path / "work"), "train.epochs=1",
                               "model.max_text_tokens=16", timeout=1200)
    assert set(result["rows"]) == {"ce", "megl_cf"} and result["runs"] == 2 and result["seeds"] == 1
    for row in result["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert row["miou"] is None or 0.0 <= row["miou"] <= 1.0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["row"], r["seed"]) for r in records] == [("ce", 0), ("megl_cf", 0)]
    assert all(r["steps"] == records[0]["steps"] > 0 for r in records)  # the same schedule for every row
    table = (out / "ablation.md").read_text()
    assert "| CE only | 1 |" in table and "counterfactual" in table and "0.7858" in table
    assert "points of test accuracy over CE only" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running finds both runs done and trains nothing
    again, _ = run_bench("ablation", "--rows", "ce,megl_cf", "--seeds", "1", "--n-per-class", "10", "--out",
                         str(out), "--work", str(tmp_path / "work"), "train.epochs=1", "model.max_text_tokens=16")
    assert again["rows"] == result["rows"] and again["seconds"] < result["seconds"]

"""``bench/ablation.py`` end to end at toy size: two rows through the Ray trainer (one Ray Train worker each: the
bench's own runs use two; the committed results use ``--trainer local``), then its table, chart and JSON."""

import json
from pathlib import Path

import pytest

from tests.support.bench_support import run_bench


def _ablation_module():
    import importlib.util

    from tests.support.bench_support import ROOT

    spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation


def test_a_work_folder_with_a_converted_dataset_is_not_generated_again(tmp_path: Path, monkeypatch):
    from megl_ray.data import make_sample
    from megl_ray.data.schema import DATASET_INFO_FILE

    ablation = _ablation_module()
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / DATASET_INFO_FILE).write_text("{}")
    monkeypatch.setattr(make_sample, "main", lambda argv: pytest.fail(f"generated again: {argv}"))
    assert ablation.make_dataset(tmp_path, "digits", 80) == str(tmp_path / "digits")


def test_every_row_is_a_valid_config_and_the_label_free_prompt_has_no_label():
    from megl_ray.config import load_config, packaged_config

    ablation = _ablation_module()
    assert set(ablation.DEFAULT_ROWS) <= set(ablation.ROWS) and ablation.DEFAULT_ROWS[0] == "ce"
    configs = {row: load_config(packaged_config("tiny"), overrides) for row, (_, overrides) in ablation.ROWS.items()}
    assert configs["ce"].loss.text_weight == configs["ce"].loss.visual_weight == 0
    assert configs["megl_cf"].loss.counterfactual_weight > 0 and configs["megl"].loss.counterfactual_weight == 0
    assert configs["megl_cf"].loss.counterfactual_regions == "prior"
    assert configs["megl_cf_saliency"].loss.counterfactual_regions == "saliency"
    prompt = configs["megl_label_free"].model.prompt_template  # a string, not YAML's reading of "USER: ..."
    assert prompt == ablation.LABEL_FREE_PROMPT and "{label}" not in prompt and "<image>" in prompt


@pytest.mark.slow
def test_ablation_trains_each_row_and_writes_its_table_chart_and_json(tmp_path: Path):
    out = tmp_path / "out"
    result, stderr = run_bench(
        "ablation",
        "--rows",
        "ce,megl_cf",
        "--seeds",
        "1",
        "--trainer",
        "ray",
        "--n-per-class",
        "10",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "train.epochs=1",
        "train.num_workers=1",
        "model.max_text_tokens=16",
        timeout=1200,
    )
    assert set(result["rows"]) == {"ce", "megl_cf"} and result["runs"] == 2 and result["seeds"] == 1
    for row in result["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
        assert row["miou"] is None or 0.0 <= row["miou"] <= 1.0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["row"], r["seed"]) for r in records] == [("ce", 0), ("megl_cf", 0)]
    assert all(r["steps"] == records[0]["steps"] > 0 for r in records)  # the same schedule for every row
    table = (out / "ablation.md").read_text()
    assert "| CE only | 1 |" in table and "counterfactuals" in table and "0.7858" in table
    assert "Δ accuracy vs CE" in table and "bootstrap" in table
    # one outcome per test image, the same images for both rows (what the paired interval needs)
    assert len({len(r["outcomes"]["accuracy"]) for r in records}) == 1
    assert all(set(r["outcomes"]["accuracy"]) <= {0, 1} for r in records)
    assert set(result["vs_ce"]) == {"megl_cf"} and len(result["vs_ce"]["megl_cf"]["accuracy"]) == 3
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # re-running finds both runs done and trains nothing
    again, _ = run_bench(
        "ablation",
        "--rows",
        "ce,megl_cf",
        "--seeds",
        "1",
        "--n-per-class",
        "10",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        "train.epochs=1",
        "train.num_workers=1",
        "model.max_text_tokens=16",
    )
    assert again["rows"] == result["rows"] and again["seconds"] < result["seconds"]

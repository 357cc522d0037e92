"""bench/ablation_stats.py: per-image IoU, the paired bootstrap against CE only and the summary, by hand."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _stats():
    spec = importlib.util.spec_from_file_location("ablation_stats", ROOT / "bench" / "ablation_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_iou_per_image_leaves_out_images_whose_two_regions_are_empty():
    pred = np.zeros((3, 2, 2), dtype=bool)
    gt = np.zeros((3, 2, 2), dtype=bool)
    pred[0, 0, :] = True  # 2 px
    gt[0, :, 0] = True  # 2 px, 1 shared: IoU 1/3
    gt[1, 1, 1] = True  # nothing predicted: 0
    assert _stats().iou_per_image(pred, gt) == [pytest.approx(1 / 3), 0.0, None]


def test_the_paired_difference_is_the_mean_over_seeds_and_its_interval_brackets_it():
    stats = _stats()
    row = [[1, 1, 0, 1, 1, 0, 1, 1], [1, 0, 1, 1, 1, 1, 0, 1]]
    base = [[0, 1, 0, 0, 1, 0, 0, 1], [1, 0, 0, 0, 1, 0, 0, 0]]
    d, low, high = stats.paired_bootstrap(row, base, 500, seed=1)
    assert d == pytest.approx(np.mean([np.mean(np.subtract(r, b)) for r, b in zip(row, base)]))  # (3/8 + 4/8) / 2
    assert low <= d <= high and low > 0  # every image either gained or stayed: no resample goes below 0
    assert stats.paired_bootstrap(base, base, 200) == (0.0, 0.0, 0.0)  # a row against itself: exactly no difference


def test_images_without_an_outcome_are_left_out_on_both_sides():
    stats = _stats()
    d, _, _ = stats.paired_bootstrap([[0.5, None, 0.9]], [[0.25, 0.8, None]], 100)
    assert d == pytest.approx(0.25)  # only the first image has both
    assert stats.paired_bootstrap([[None]], [[0.3]], 10) is None


def test_summarise_gives_mean_std_per_row_and_the_paired_interval_against_ce():
    stats = _stats()
    records = []
    for seed, (ce, megl) in enumerate([([0, 1, 0, 1], [1, 1, 0, 1]), ([0, 0, 1, 1], [1, 1, 1, 1])]):
        for row, correct in (("ce", ce), ("megl", megl)):
            records.append(
                {"row": row, "seed": seed, "accuracy": float(np.mean(correct)), "macro_f1": 0.5, "miou": 0.4,
                 "bleu4": None, "outcomes": {"accuracy": correct, "miou": [0.4, None, None, None]}}
            )  # fmt: skip
    summary = stats.summarise(records, {"ce": "CE only", "megl": "full MEGL"})
    assert summary["ce"]["accuracy"] == pytest.approx((0.5, 0.0)) and "vs_base" not in summary["ce"]
    megl = summary["megl"]
    assert megl["accuracy"][0] == pytest.approx(0.875) and megl["accuracy"][1] == pytest.approx(
        np.std([0.75, 1.0], ddof=1)
    )
    assert megl["vs_base"]["accuracy"][0] == pytest.approx(0.375) and megl["vs_base"]["miou"][0] == pytest.approx(0.0)
    assert megl["accuracy_per_seed"] == [0.75, 1.0] and megl["bleu4"] == (None, None)
    table = stats.markdown(summary, "t", "c", {"ce": 0.7858})
    assert "| full MEGL | 2 | 0.875 ± 0.177 | +37.5 [" in table and "| 0.7858 |" in table

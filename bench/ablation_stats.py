"""Statistics and pictures of ``bench/ablation.py``: per-image outcomes, paired bootstrap intervals against CE only,
the table and the chart. Plain numpy and matplotlib: no torch, no Ray (tested on hand-made outcomes)."""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("accuracy", "macro_f1", "miou", "bleu4")
PAIRED = ("accuracy", "miou")
"""Metrics with a per-image outcome (correct: 0/1; IoU of the image's map where it has a mask), hence a paired
difference against CE only with a bootstrap interval."""
BOOTSTRAP_SAMPLES = 2000


def iou_per_image(pred: np.ndarray, gt: np.ndarray) -> list[float | None]:
    """IoU of each image's binary saliency region ``pred`` (N, H, W) with its mask region ``gt`` (N, H, W); None
    where both are empty (torchmetrics' MeanIoU leaves those out too)."""
    inter = np.logical_and(pred, gt).sum(axis=(1, 2))
    union = np.logical_or(pred, gt).sum(axis=(1, 2))
    return [None if u == 0 else float(i / u) for i, u in zip(inter, union)]


def paired_bootstrap(
    row: Sequence[Sequence[float | None]], base: Sequence[Sequence[float | None]], samples: int, seed: int = 0
) -> tuple[float, float, float] | None:
    """Mean over seeds of (row − base) on the same test images, with a 95 % percentile interval from resampling
    the test images (the same resampled images for every seed and both rows: the pairing).

    ``row``/``base``: per seed, one outcome per test image in the split's order (None: no outcome for that image,
    left out of that seed's mean on both sides). Returns (difference, low, high), or None without outcomes."""
    if not row or len(row) != len(base):
        return None
    a = np.array([[np.nan if v is None else v for v in seed_values] for seed_values in row], dtype=float)
    b = np.array([[np.nan if v is None else v for v in seed_values] for seed_values in base], dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"row and base scored different test images: {a.shape} vs {b.shape}")
    both = ~np.isnan(a) & ~np.isnan(b)
    diff = np.where(both, a - b, 0.0)
    if not both.any(axis=1).all():
        return None

    def estimate(index: np.ndarray) -> float:
        counts = both[:, index].sum(axis=1)
        if not counts.all():  # a resample without a paired outcome for some seed: no estimate from it
            return float("nan")
        return float(np.mean(diff[:, index].sum(axis=1) / counts))

    n = a.shape[1]
    rng = np.random.default_rng(seed)
    draws = np.array([estimate(rng.integers(0, n, size=n)) for _ in range(samples)])
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return estimate(np.arange(n)), float(low), float(high)


def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records: list[dict[str, Any]], rows: dict[str, str], base: str = "ce") -> dict[str, dict[str, Any]]:
    """Per row (in ``rows`` order, ``rows`` mapping row → label): seeds, mean ± std of every metric, each seed's
    accuracy, and the paired difference to ``base`` with its interval for every metric in ``PAIRED``."""
    summary: dict[str, dict[str, Any]] = {}
    base_records = {r["seed"]: r for r in records if r["row"] == base}
    for row, label in rows.items():
        mine = sorted((r for r in records if r["row"] == row), key=lambda r: r["seed"])
        if not mine:
            continue
        entry: dict[str, Any] = {
            "label": label,
            "seeds": len(mine),
            **{m: mean_std([r[m] for r in mine]) for m in METRICS},
        }
        entry["accuracy_per_seed"] = [r["accuracy"] for r in mine]
        paired = [r for r in mine if r["seed"] in base_records and "outcomes" in r]
        if row != base and paired and len(paired) == len(mine):
            entry["vs_base"] = {
                m: paired_bootstrap(
                    [r["outcomes"][m] for r in paired],
                    [base_records[r["seed"]]["outcomes"][m] for r in paired],
                    BOOTSTRAP_SAMPLES,
                )
                for m in PAIRED
            }
        summary[row] = entry
    return summary


def _cell(pair: tuple[float | None, float | None]) -> str:
    mean, std = pair
    return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"


def _interval(value: tuple[float, float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if value is None:
        return "—"
    d, lo, hi = (scale * v for v in value)
    return f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def markdown(summary: dict[str, dict[str, Any]], title: str, context: str, paper: dict[str, float]) -> str:
    lines = [
        f"# {title}\n\n{context}\n",
        "| row | seeds | test accuracy | Δ accuracy vs CE, points [95 % CI] | accuracy per seed | mIoU | Δ mIoU vs CE "
        "[95 % CI] | macro-F1 | BLEU-4 | paper ViT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row, s in summary.items():
        vs = s.get("vs_base", {})
        seeds = ", ".join(f"{a:.3f}" for a in s["accuracy_per_seed"])
        accuracy, miou = _interval(vs.get("accuracy")), _interval(vs.get("miou"), 1.0, 2)
        lines.append(
            f"| {s['label']} | {s['seeds']} | {_cell(s['accuracy'])} | {accuracy} | {seeds} | {_cell(s['miou'])} | "
            f"{miou} | {_cell(s['macro_f1'])} | {_cell(s['bleu4'])} | {paper.get(row, '—')} |"
        )
    lines.append(
        "\nΔ: paired difference to CE only on the same test images, averaged over seeds (same seed against same "
        f"seed); the interval is the 2.5-97.5 percentile of {BOOTSTRAP_SAMPLES} bootstrap resamples of the test "
        "images. Accuracy Δ in points (×100), mIoU Δ in IoU units."
    )
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Two panels: test accuracy and mIoU per row (mean, seed std as a thin bar), and the paired Δ accuracy vs
    CE only with its 95 % bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [textwrap.fill(s["label"], 16) for s in summary.values()]
    xs = np.arange(len(labels))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(labels)), 4.8))
    for offset, metric in ((-0.2, "accuracy"), (0.2, "miou")):
        means = [s[metric][0] or 0.0 for s in summary.values()]
        stds = [s[metric][1] or 0.0 for s in summary.values()]
        left.bar(xs + offset, means, 0.4, yerr=stds, capsize=3, label=f"{metric} (mean ± seed std)")
    left.set_ylim(0, 1)
    left.set_title("test split")
    left.legend(fontsize=8)
    deltas = [s.get("vs_base", {}).get("accuracy") for s in summary.values()]
    for x, d in zip(xs, deltas):
        if d is not None:
            right.errorbar(x, 100 * d[0], yerr=[[100 * (d[0] - d[1])], [100 * (d[2] - d[0])]], fmt="o", capsize=4)
    right.axhline(0, color="grey", lw=0.8)
    right.set_title("Δ test accuracy vs CE only, points (paired, 95 % bootstrap CI)")
    for ax in (left, right):
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

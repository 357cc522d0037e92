"""The MEGL paper's ablation (arXiv 2411.13053, Table 4) as a benchmark, plus this project's two options.

    python bench/ablation.py                       # bundled-style shortcut digits, 3 seeds, all rows
    python bench/ablation.py --data DATASET --seeds 5 --rows ce,megl,megl_rrr --out bench/results/my_ablation

Each row × seed is one run of the real trainer, ``megl_ray.driver.fit.fit`` (Ray Train + DeepSpeed ZeRO-2, Ray Data),
all on one Ray instance started once. Every exported model is then scored on the test split: accuracy, macro-F1,
mIoU of Â against the ground-truth masks and BLEU-4 of greedy rationales (``megl_ray.evaluation.metrics``). Without
``--data`` the dataset is ``python -m megl_ray.data.make_sample --shortcut``: a dark square whose position encodes
the label in train and val and is random in test, so test accuracy is *decoy-free* accuracy: what the classifier
learnt from the digit itself. At the default size (80 per class) one seed of the 7 default rows takes ~13 minutes on
2 cores, three seeds ~39 (bench/results/ablation/README.md).

Writes, under ``--out``: ``runs.jsonl`` (one line per finished run; re-running skips those, so an interrupted
ablation resumes), ``ablation.md`` (mean ± std over seeds, beside the paper's ViT column), ``ablation.png`` (bar
chart) and ``ablation.json``. Logs go to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megl_ray.cli import ArgumentParser, run_cli, setup_logging  # noqa: E402
from megl_ray.errors import UserError  # noqa: E402

log = logging.getLogger("bench.ablation")

LABEL_FREE_PROMPT = "USER: <image>\nWhat digit is this, and why? ASSISTANT:"
# λ_cf 3, not 1: in-process checks on the 80-per-class shortcut digits (seed 0; 216 steps at global batch 32),
# decoy-free test accuracy 0.60 at λ_cf 3 against 0.08 at λ_cf 1 (CE only: 0.11); seeds 1 and 2 at λ_cf 3: 0.32, 0.68.
CF_WEIGHT = 3.0
RRR_WEIGHT = 10.0
# Table 4 rows (CE only, + visual, + text, + visual + text, + L_dc = full MEGL), then this project's options:
# counterfactual-background consistency (loss.counterfactual_weight, item 3 of issue 11), the label-free prompt
# (item 4) and, on request (--rows), the input-gradient penalty (loss.rrr_weight).
ROWS: dict[str, tuple[str, list[str]]] = {
    "ce": ("CE only", ["loss.text_weight=0", "loss.visual_weight=0"]),
    "visual": ("+ visual", ["loss.text_weight=0", "loss.dc_weight=0"]),
    "text": ("+ text", ["loss.visual_weight=0"]),
    "visual_text": ("+ visual + text", ["loss.dc_weight=0"]),
    "megl": ("+ L_dc (full MEGL)", []),
    "megl_cf": (
        f"full MEGL + counterfactual backgrounds (loss.counterfactual_weight={CF_WEIGHT:g})",
        [f"loss.counterfactual_weight={CF_WEIGHT}"],
    ),
    # json.dumps: a double-quoted YAML string, else "USER: <image>..." would be read as a mapping
    "megl_label_free": ("full MEGL, label-free prompt", [f"model.prompt_template={json.dumps(LABEL_FREE_PROMPT)}"]),
    "megl_rrr": (f"full MEGL + RRR (loss.rrr_weight={RRR_WEIGHT:g})", [f"loss.rrr_weight={RRR_WEIGHT}"]),
}
DEFAULT_ROWS = ("ce", "visual", "text", "visual_text", "megl", "megl_cf", "megl_label_free")
PAPER_VIT = {"ce": 0.7858, "visual": 0.8206, "text": 0.8220, "visual_text": 0.8234, "megl": 0.8317}
"""Table 4 of the paper, ViT backbone, accuracy (its own datasets, not ours)."""
METRICS = ("accuracy", "macro_f1", "miou", "bleu4")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python bench/ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="converted dataset (local dir or s3://); default: make_sample --shortcut")
    p.add_argument("--n-per-class", type=int, default=80, help="images per class of the generated dataset")
    p.add_argument("--seeds", type=int, default=3, help="seeds per row (train.seed = 0..N-1)")
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help=f"comma-separated rows (default {','.join(DEFAULT_ROWS)}; also: megl_rrr)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "ablation"), help="results folder")
    p.add_argument("--work", help="scratch folder for data and runs (default: a new temp dir)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every row")
    return p


def make_dataset(work: Path, n_per_class: int) -> str:
    from megl_ray.data import convert, make_sample
    from megl_ray.data.schema import DATASET_INFO_FILE

    src, dst = work / "shortcut-src", work / "shortcut"
    if not (dst / DATASET_INFO_FILE).is_file():  # a --work folder of an earlier run: its dataset again
        make_sample.main([str(src), "--shortcut", "--n-per-class", str(n_per_class), "--overwrite"])
        convert.main([str(src), str(dst), "--overwrite"])
    return str(dst)


def score_export(export: str, data: str) -> dict[str, float | None]:
    """Test-split accuracy, macro-F1, mIoU and BLEU-4 of an exported model, in this process."""
    import torch

    from megl_ray.data.reader import read_split
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.evaluation.evaluate_run import predict_in_process
    from megl_ray.evaluation.metrics import ClassificationMetrics, SaliencyMetrics
    from megl_ray.evaluation.text_metrics import bleu4
    from megl_ray.model.export_io import load_export

    info = load_dataset_info(data)
    table = read_split(data, "test", info)
    out = predict_in_process(load_export(export), table, info.mask_size, 64, num_beams=1, max_new_tokens=32)
    cls, sal = ClassificationMetrics(info.num_classes), SaliencyMetrics()
    cls.update(torch.as_tensor(out["probs"]), torch.as_tensor(out["label"]))
    sal.update(
        torch.as_tensor(out["saliency"]), torch.as_tensor(out["mask"]).float() / 255.0, torch.as_tensor(out["has_mask"])
    )
    c, s = cls.compute(), sal.compute()
    refs = [list(r) for r in table.column("rationales").to_pylist()]
    return {
        "accuracy": c["accuracy"],
        "macro_f1": c["macro_f1"],
        "miou": s["miou"],
        "bleu4": bleu4([str(g) for g in out["generated"]], refs),
    }


def run_one(row: str, seed: int, data: str, runs: Path, overrides: Sequence[str]) -> dict[str, Any]:
    from megl_ray.config import load_config, packaged_config
    from megl_ray.driver.fit import fit

    name = f"{row}-s{seed}"
    cfg = load_config(
        packaged_config("tiny"),
        [
            *overrides,
            *ROWS[row][1],
            f"train.seed={seed}",
            f"data.uri={data}",
            f"run.storage_path={runs}",
            f"run.name={name}",
            "run.log_every=1000",
        ],
    )
    started = time.monotonic()
    result = fit(cfg, evaluate_test=False)
    metrics = score_export(result["export"], data)
    return {
        "row": row,
        "seed": seed,
        **metrics,
        "steps": result["steps"],
        "seconds": round(time.monotonic() - started, 1),
    }


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarise(records: list[dict[str, Any]], rows: list[str]) -> dict[str, dict[str, Any]]:
    summary = {}
    for row in rows:
        mine = [r for r in records if r["row"] == row]
        if mine:
            summary[row] = {
                "label": ROWS[row][0],
                "seeds": len(mine),
                **{m: _mean_std([r[m] for r in mine]) for m in METRICS},
            }
    return summary


def markdown(summary: dict[str, dict[str, Any]], context: str) -> str:
    def cell(pair):
        mean, std = pair
        return "n/a" if mean is None else f"{mean:.3f} ± {std:.3f}"

    lines = [
        f"# MEGL ablation (Table 4 rows + options)\n\n{context}\n",
        "| row | seeds | test accuracy (decoy-free) | macro-F1 | mIoU | BLEU-4 | paper ViT accuracy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, s in summary.items():
        paper = f"{PAPER_VIT[row]:.4f}" if row in PAPER_VIT else "—"
        lines.append(f"| {s['label']} | {s['seeds']} | " + " | ".join(cell(s[m]) for m in METRICS) + f" | {paper} |")
    base = summary.get("ce", {}).get("accuracy", (None,))[0]
    if base is not None:
        lines.append("")
        for row, s in summary.items():
            if row != "ce" and s["accuracy"][0] is not None:
                lines.append(
                    f"- {s['label']}: {100 * (s['accuracy'][0] - base):+.1f} points of test accuracy over "
                    "CE only"
                    + (f" (paper: {100 * (PAPER_VIT[row] - PAPER_VIT['ce']):+.1f})" if row in PAPER_VIT else "")
                )
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["label"].replace(" (", "\n(").replace(", ", ",\n") for s in summary.values()]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(labels)), 4.5))
    width = 0.8 / len(METRICS)
    for i, metric in enumerate(METRICS):
        means = [s[metric][0] or 0.0 for s in summary.values()]
        stds = [s[metric][1] or 0.0 for s in summary.values()]
        xs = [k + (i - (len(METRICS) - 1) / 2) * width for k in range(len(labels))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=metric)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test split (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=len(METRICS))
    ax.set_title("MEGL ablation on shortcut digits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows: unknown row(s) {', '.join(unknown) or '(none)'} (valid: {', '.join(ROWS)})")
    if args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="megl-ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    data = args.data or make_dataset(work, args.n_per_class)
    done_path = out / "runs.jsonl"
    records = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.is_file() else []
    started = time.monotonic()
    try:
        for seed in range(args.seeds):  # seeds outermost: an interrupted ablation still has every row
            for row in rows:
                if any(r["row"] == row and r["seed"] == seed for r in records):
                    continue
                log.info("ablation: row %s seed %d", row, seed)
                record = run_one(row, seed, data, work / "runs", args.overrides)
                log.info("ablation: %s", record)
                records.append(record)
                with done_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    finally:
        import ray

        ray.shutdown()
    summary = summarise(records, rows)
    context = (
        f"Dataset: `{args.data or f'make_sample --shortcut --n-per-class {args.n_per_class}'}`; the tiny "
        f"preset (`megl_ray/config/presets/tiny.yaml`) with overrides {list(args.overrides) or 'none'}; "
        "seeds (train.seed = 0, 1, ...) per row as in the table; through `megl_ray.driver.fit.fit` (2 Ray Train "
        "workers, DeepSpeed "
        "ZeRO-2, CPU). Test accuracy is decoy-free: the decoy's position is random in the test split. "
        "The paper's column is its ViT Table 4 accuracy on its own datasets, for the direction of each row."
    )
    (out / "ablation.md").write_text(markdown(summary, context))
    chart(summary, out / "ablation.png")
    result = {
        "rows": {k: {m: v[m][0] for m in METRICS} for k, v in summary.items()},
        "std": {k: {m: v[m][1] for m in METRICS} for k, v in summary.items()},
        "seeds": args.seeds,
        "runs": len(records),
        "data": data,
        "out": str(out),
        "seconds": round(time.monotonic() - started, 1),
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("bench/ablation.py", main))

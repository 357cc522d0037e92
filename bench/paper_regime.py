"""The paper's Table 4 in the paper's regime: no planted shortcut, small data, masks on 10 %, several seeds, three
starting points — the paper's loss weights, the project's defaults, and a pretrained classifier.

    python bench/paper_regime.py [--seeds 5] [--per-class 30] [--out bench/results/paper_regime] [key=value ...]

Data (``python -m megl_ray.data.make_animals``, no shortcut): ``--per-class`` train images per class (masks on 10 %
of them), 10 val and 50 test per class (every test image with a mask, so mIoU is measured on all of them). The
pretrained classifier is the tiny CNN trained with CE alone on ``--pretrain-per-class`` images per class drawn from
the *other* half of the silhouettes (``--part pretrain``: no image shared with the benchmark), the way the paper's
backbones start from ImageNet; each row then fine-tunes it with its own objective.

Each variant is one ``bench/ablation.py`` run over the paper's rows (CE, + visual, + text, + visual + text, + L_dc)
and one diagnostic row (full MEGL with the one-sided visual target ``loss.visual_transform=haics``: attention
outside the object penalised, none demanded on every part of it) into ``--out/<variant>/`` (table, chart with
paired bootstrap intervals, JSON); ``summary.md`` puts the variants side by side: the paper's weights and the
project's defaults, each from scratch and from the pretrained classifier. Variants run two at a time in separate
processes (one torch thread each: two cores). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # ablation's helpers, also when this file is loaded by path

from ablation import generated_dataset  # noqa: E402

from megl_ray.cli import ArgumentParser, run_cli, setup_logging  # noqa: E402

PAPER_WEIGHTS = [  # the paper's constant weights (its Table 4 setting): λ_text 1, λ_vis 1, λ_dc 0.1, no ramp
    "loss.text_weight=1",
    "loss.visual_weight=1",
    "loss.dc_weight=0.1",
    "loss.visual_ramp_start=0",
    "loss.visual_ramp_end=0",
]
FINE_TUNE_LR = "optim.classifier_lr=0.003"  # a pretrained trunk is fine-tuned at the preset's VLM rate, not 0.01
VARIANTS = ("paper_weights", "project_defaults", "pretrained", "pretrained_defaults")
ROWS = "ce,visual,text,visual_text,megl,megl_haics"


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python bench/paper_regime.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5, help="seeds per row (default 5)")
    p.add_argument("--per-class", type=int, default=30, help="train images per class (default 30)")
    p.add_argument("--pretrain-per-class", type=int, default=200, help="images per class to pretrain on")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of every row")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_regime"), help="results folder")
    p.add_argument(
        "--work", default=None, help="scratch folder: data, pretraining, exports (default: TMP/megl-paper-regime)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    return p


def _dataset(work: Path, name: str, flags: list[str]) -> str:
    from megl_ray.data import make_animals

    return generated_dataset(work, name, make_animals.main, flags)


def pretrain(work: Path, per_class: int, epochs: int) -> str:
    """CE-only tiny CNN on the disjoint half; its classifier tensors saved as a state-dict file for
    ``model.classifier_weights`` (the head is replaced on load, as torchvision's ImageNet head is)."""
    import torch
    from safetensors.torch import load_file, save_file

    from megl_ray.config import load_config, packaged_config
    from megl_ray.model.export_io import WEIGHTS_FILE
    from megl_ray.training.local import train

    target = work / "pretrained_classifier.safetensors"
    if target.is_file():
        return str(target)
    data = _dataset(work, "pretrain", ["--part", "pretrain", "--train-per-class", str(per_class),
                                        "--val-per-class", "20", "--test-per-class", "20"])  # fmt: skip
    cfg = load_config(
        packaged_config("tiny"),
        [f"data.uri={data}", "loss.text_weight=0", "loss.visual_weight=0", f"train.epochs={epochs}",
         "data.batch_size=32", "run.log_every=1000"],
    )  # fmt: skip
    export = work / "pretrain-export"
    result = train(cfg, 0, str(export))
    state = load_file(str(export / WEIGHTS_FILE))
    classifier = {
        k.removeprefix("classifier."): v.contiguous() for k, v in state.items() if k.startswith("classifier.")
    }
    save_file({k: v.to(torch.float32) for k, v in classifier.items()}, str(target))
    (work / "pretrain.json").write_text(json.dumps({k: result[k] for k in ("steps", "val_accuracy", "test_accuracy")}))
    return str(target)


def variant_args(
    variant: str, data: str, out: Path, work: Path, seeds: int, epochs: int, weights: str | None
) -> list[str]:
    overrides = [f"train.epochs={epochs}"]
    if variant in ("paper_weights", "pretrained"):
        overrides += PAPER_WEIGHTS
    if variant.startswith("pretrained"):
        overrides += [f"model.classifier_weights={weights}", FINE_TUNE_LR]
    title = {
        "paper_weights": "Paper regime, the paper's weights (λ_vis 1, λ_dc 0.1, no ramp), classifier from scratch",
        "project_defaults": "Paper regime, the project's defaults (tiny.yaml: λ_vis 10 ramped, λ_dc 0.01), scratch",
        "pretrained": "Paper regime, the paper's weights, a CE-pretrained classifier fine-tuned",
        "pretrained_defaults": "Paper regime, the project's defaults, a CE-pretrained classifier fine-tuned",
    }[variant]
    return ["--data", data, "--rows", ROWS, "--seeds", str(seeds), "--threads", "1", "--title", title,
            "--out", str(out / variant), "--work", str(work / variant), *overrides]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    out = Path(args.out)
    work = Path(args.work or Path(tempfile.gettempdir()) / "megl-paper-regime")  # reused: a rerun resumes
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data = _dataset(work, "benchmark", ["--train-per-class", str(args.per_class), "--val-per-class", "10",
                                         "--test-per-class", "50"])  # fmt: skip
    pretrained = any(v.startswith("pretrained") for v in variants)
    weights = pretrain(work, args.pretrain_per_class, 15) if pretrained else None
    bench = [sys.executable, str(REPO / "bench" / "ablation.py")]
    results: dict[str, Any] = {}
    waiting, running = list(variants), {}
    while waiting or running:  # two processes at a time, one per core; the next starts when one ends
        while waiting and len(running) < 2:
            v = waiting.pop(0)
            argv = [*bench, *variant_args(v, data, out, work, args.seeds, args.epochs, weights), *args.overrides]
            running[v] = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        done = next((v for v, proc in running.items() if proc.poll() is not None), None)
        if done is None:
            time.sleep(2)
            continue
        proc = running.pop(done)
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"paper_regime: variant {done} failed (exit {proc.returncode})")
        results[done] = json.loads(stdout.strip().splitlines()[-1])
    results = {v: results[v] for v in variants}
    (out / "summary.md").write_text(summary(results, args))
    return {
        "variants": {v: {"rows": r["rows"], "vs_ce": r["vs_ce"]} for v, r in results.items()},
        "seeds": args.seeds,
        "out": str(out),
        "seconds": round(time.monotonic() - started, 1),
    }


def summary(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Table 4 in the paper's regime: three starting points side by side\n",
        f"make_animals, no shortcut, {args.per_class} train images per class (10 % with masks), 500 test images; "
        f"{args.seeds} seeds; {args.epochs} epochs. Each cell: test accuracy (mean over seeds) and the paired Δ to "
        "CE only in points with its 95 % bootstrap interval; mIoU beside. Per-variant tables: "
        "`<variant>/ablation.md`.\n",
        "| row | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for row in ROWS.split(","):
        cells = []
        for r in results.values():
            if row not in r["rows"]:
                cells.append("—")
                continue
            acc, miou = r["rows"][row]["accuracy"], r["rows"][row]["miou"]
            vs = r["vs_ce"].get(row, {}).get("accuracy")
            delta = "" if vs is None else f" ({100 * vs[0]:+.1f} [{100 * vs[1]:+.1f}, {100 * vs[2]:+.1f}])"
            cells.append(f"{acc:.3f}{delta}, mIoU {miou:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("bench/paper_regime.py", main))

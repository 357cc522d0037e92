"""What the visual term does to the classifier, read off the models ``bench/paper_regime.py`` trained.

    python bench/feature_probe.py [--work TMP/megl-paper-regime] [--out bench/results/paper_regime]

For each variant, row and seed (the exports under ``--work``), on the benchmark's test split (every test image has
a mask) and its train split:

- ``accuracy``: the model as trained;
- ``linear_probe``: a logistic regression fitted on the frozen, globally pooled last-stage features of the train
  images and scored on the test images: how much class information the features still hold, whatever the head
  and the CAM constraint do with it;
- ``object_only``: accuracy with everything outside the (dilated) mask replaced by the image's mean background
  colour: what the object alone tells the model;
- ``cam_in_mask``: the share of the predicted class's CAM mass inside the mask.

Writes ``features.md`` and ``features.json`` under ``--out``; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from megl_ray.cli import ArgumentParser, run_cli, setup_logging  # noqa: E402
from megl_ray.data.reader import read_split  # noqa: E402
from megl_ray.data.schema import load_dataset_info  # noqa: E402
from megl_ray.data.transforms import preprocess_rows  # noqa: E402
from megl_ray.model.classifier import fit_pixels  # noqa: E402
from megl_ray.model.counterfactual import background_images, explained_region  # noqa: E402
from megl_ray.model.export_io import load_export  # noqa: E402
from megl_ray.model.saliency import upsample  # noqa: E402

ROWS = ("ce", "visual", "megl", "megl_haics")


def _pixels(exported: Any, table: Any, mask_size: int) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    model, cfg = exported.model, exported.config
    pre = preprocess_rows(
        table.to_pydict(),
        model.tokenizer,
        model.pixel_size,
        mask_size,
        1,
        cfg.model.max_text_tokens,
        cfg.model.image_aspect,
    )
    pixels = torch.as_tensor(pre["pixels"]).float().div_(255.0)
    masks = torch.as_tensor(pre["mask"]).float().div_(255.0)
    return pixels, np.asarray(pre["label"]), masks, np.asarray(pre["has_mask"], dtype=bool)


@torch.no_grad()
def _features(model: Any, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, predicted labels) in batches of 128."""
    feats, preds = [], []
    for start in range(0, len(pixels), 128):
        batch = fit_pixels(pixels[start : start + 128], model.cfg.image_size)
        out = model.classifier(batch)
        feats.append(out.features.float().mean(dim=(2, 3)).numpy())
        preds.append(out.logits.argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def probe(export: str, data: str) -> dict[str, float]:
    info = load_dataset_info(data)
    exported = load_export(export)
    model = exported.model.eval()
    train_px, train_y, _, _ = _pixels(exported, read_split(data, "train", info), info.mask_size)
    test_px, test_y, masks, has_mask = _pixels(exported, read_split(data, "test", info), info.mask_size)
    train_f, _ = _features(model, train_px)
    test_f, pred = _features(model, test_px)
    lr = LogisticRegression(max_iter=2000, C=1.0).fit(train_f, train_y)
    keep = torch.as_tensor(has_mask)
    region = explained_region(torch.zeros(len(test_px), 2, 2), masks, keep, tuple(test_px.shape[-2:]))
    object_only = background_images(test_px, 1 - region)  # the outside blanked: the object kept
    _, object_pred = _features(model, object_only)
    probs, saliency = model.predict(test_px)
    sal = upsample(saliency.float(), tuple(masks.shape[-2:]))[:, 0]
    inside = (sal * (masks >= 0.5)).flatten(1).sum(1) / sal.flatten(1).sum(1).clamp_min(1e-8)
    return {
        "accuracy": float((pred == test_y).mean()),
        "linear_probe": float(lr.score(test_f, test_y)),
        "object_only": float((object_pred == test_y)[has_mask].mean()),
        "cam_in_mask": float(inside[keep].mean()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python bench/feature_probe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "megl-paper-regime"), help="paper_regime's")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_regime"), help="results folder")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of each row")
    p.add_argument("--variants", default="", help="comma-separated variants (default: every one under --work)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    data = str(work / "benchmark")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, dict[str, dict[str, float]]] = {}
    chosen = [v for v in args.variants.split(",") if v] or sorted(
        p.name for p in work.iterdir() if (p / "runs").is_dir()
    )
    for variant in chosen:
        for row in ROWS:
            per_seed = [
                probe(str(export), data)
                for seed in range(args.seeds)
                if (export := work / variant / "runs" / f"{row}-s{seed}" / "export").is_dir()
            ]
            if per_seed:
                results.setdefault(variant, {})[row] = {
                    k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0]
                } | {"seeds": len(per_seed)}
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "features.json"  # variants probed before (another --variants) are kept
    results = (json.loads(earlier.read_text()) if earlier.is_file() else {}) | results
    lines = [
        "# What the visual term does to the classifier (paper regime, test split, mean over seeds)\n",
        "`python bench/feature_probe.py`: accuracy as trained; linear probe = logistic regression on the frozen "
        "pooled last-stage features (fit on train, scored on test); object only = accuracy with the background "
        "outside the dilated mask replaced by its mean colour; CAM in mask = share of the predicted class's CAM "
        "mass inside the mask.\n",
        "| variant | row | seeds | accuracy | linear probe | object only | CAM in mask |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rows in results.items():
        for row, r in rows.items():
            lines.append(
                f"| {variant} | {row} | {r['seeds']} | {r['accuracy']:.3f} | {r['linear_probe']:.3f} | "
                f"{r['object_only']:.3f} | {r['cam_in_mask']:.3f} |"
            )
    (out / "features.md").write_text("\n".join(lines) + "\n")
    (out / "features.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"variants": results, "out": str(out)}


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("bench/feature_probe.py", main))

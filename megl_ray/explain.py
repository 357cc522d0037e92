"""``python -m megl_ray.explain``: what an exported MEGL model predicts for images, where it looked, and why it says so.

    python -m megl_ray.explain --checkpoint URI IMAGE... --out DIR [--top-k 3] [--num-beams 1] [--max-new-tokens N]
    python -m megl_ray.explain --checkpoint URI --gallery --data URI [--split test] [--per-class 3] --out DIR

For each IMAGE (local path or ``s3://``): the top-k classes with probabilities, ``DIR/<name>_overlay.png`` (the
saliency Â of the predicted class, bilinearly upsampled to the image and drawn over it as a 'jet' heat map),
``DIR/<name>_saliency.png`` (the same map alone, 8-bit grey, max-normalised) and the rationale generated for the
predicted class; all listed in ``DIR/explanations.json``. ``--gallery`` writes ``DIR/index.html``: a static page
with a few examples per class of a dataset split (image, overlay, ground-truth mask when present, generated and
reference rationales), its images as files beside it. DIR may be ``s3://`` (written locally, then uploaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, add_base_path_argument, options_from, run_cli, setup_logging
from megl_ray.evaluation.options import PRECISIONS, ExplainOptions
from megl_ray.training.as_export import as_export


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.explain", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model (local dir or s3://)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (local or s3://) to explain")
    p.add_argument("--out", required=True, help="output folder (local or s3://)")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image (default 3)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width of rationale generation (1: greedy)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest generated rationale, in tokens (default: the trained model.max_text_tokens)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="VLM weights at inference (auto: bf16 on cuda, fp32 on cpu)",
    )
    add_base_path_argument(p)
    p.add_argument("--gallery", action="store_true", help="also write DIR/index.html from --data")
    p.add_argument("--data", help="converted dataset for --gallery")
    p.add_argument("--split", default="test", help="split for --gallery (default test)")
    p.add_argument("--per-class", type=int, default=3, help="gallery examples per class (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    options = options_from(ExplainOptions, args, images=tuple(args.images), base_path=tuple(args.base_path))
    # Lazy: torch and the model code load only once the arguments are understood (`--help` answers at once).
    from megl_ray.evaluation.explanations import run  # noqa: PLC0415

    with as_export(options.checkpoint) as export:  # a training checkpoint is exported on the fly
        result = run(dataclasses.replace(options, checkpoint=export))
    result["checkpoint"] = options.checkpoint
    return result


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("python -m megl_ray.explain", main))

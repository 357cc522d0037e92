"""``python -m megl_ray.evaluate``: score an exported MEGL model on one split of a converted dataset.

    python -m megl_ray.evaluate --checkpoint URI --data URI [--split test] [--out FILE] [--num-beams 1]
        [--max-new-tokens N] [--batch-size 32] [--workers N] [--device auto] [--precision auto] [--clip-path URI]
    python -m megl_ray.evaluate --efficiency --checkpoint URI [--batch-size 32] [--warmup 2] [--repeats 5]

Classification, visual-explanation and rationale metrics (``megl_ray.evaluation.metrics``,
``megl_ray.evaluation.clipscore``, ``megl_ray.evaluation.spice``; every key is defined in ``docs/evaluation.md``). A
readable table goes to stderr, the JSON to ``--out`` (default ``<checkpoint>/eval_<split>.json``, local or
``s3://``) and, as one object, to the last stdout line. ``--efficiency`` measures parameters, latency and throughput
instead (``megl_ray.evaluation.efficiency``).

Small splits run in this process. With ``--workers N`` > 1, a split of more than ``RAY_ROW_THRESHOLD`` rows, or a
driver without the GPU the model should use (a CPU head node under ``ray job submit``), Ray Data spreads prediction
and generation over actors that each hold the model: one per GPU of the cluster (``num_gpus=1``) when it has GPUs,
else CPU actors. Each process that holds the model resolves ``--device``/``--precision`` itself. Both paths feed
the model the same batches (rows [k·B, (k+1)·B) of the split) and the metrics the same outputs in the same order,
so they report identical numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, add_base_path_argument, options_from, run_cli, setup_logging
from megl_ray.errors import UserError
from megl_ray.evaluation.options import PRECISIONS, RAY_ROW_THRESHOLD, EvaluateOptions
from megl_ray.training.as_export import as_export


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported model (local dir or s3://), from --export")
    p.add_argument("--data", help="converted dataset (local dir or s3://); required unless --efficiency")
    p.add_argument("--split", default="test", help="split to score (default test)")
    p.add_argument("--out", help="where to write the JSON (default <checkpoint>/eval_<split>.json)")
    p.add_argument("--num-beams", type=int, default=1, help="beam width of rationale generation (1: greedy)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest generated rationale, in tokens (default: the trained model.max_text_tokens)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"1: in this process; N > 1: N Ray actors (default: in this process up to "
        f"{RAY_ROW_THRESHOLD} rows, else one actor per cluster GPU)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the model runs, resolved by the process holding it (auto: cuda where it sees one)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="VLM weights at inference (auto: bf16 on cuda, fp32 on cpu); the classifier stays fp32",
    )
    add_base_path_argument(p)
    p.add_argument("--clip-path", help="CLIP checkpoint dir (local or s3://) for CLIPScore; without it the key is null")
    p.add_argument(
        "--efficiency",
        action="store_true",
        help="measure parameters, latency and images/s (paper Table 5) instead of scoring a split",
    )
    p.add_argument(
        "--track",
        action="store_true",
        help="also log the metrics (eval/<split>/<metric>) to the trackers of the run that wrote the export",
    )
    p.add_argument("--warmup", type=int, default=2, help="--efficiency: untimed calls before timing")
    p.add_argument("--repeats", type=int, default=5, help="--efficiency: timed calls; the median is reported")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.track and args.efficiency:
        raise UserError("--track logs a split's metrics; --efficiency has none to log")
    options = options_from(EvaluateOptions, args, base_path=tuple(args.base_path))
    # Lazy: torch, Ray and the model code load only once the arguments are understood (`--help` answers at once).
    from megl_ray.evaluation.evaluate_run import default_out, run  # noqa: PLC0415

    # Lazy as well: tracking (TensorBoard, the trackers' clients) loads only when --track asks for it.
    from megl_ray.reporting.tracking import track_evaluation  # noqa: PLC0415

    def track(result: dict[str, Any]) -> None:
        result["tracked"] = track_evaluation(result)

    given = options.checkpoint
    with as_export(given) as export:  # a training checkpoint is exported on the fly
        if export != given:
            options = dataclasses.replace(options, checkpoint=export, out=options.out or default_out(given, args.split))
        result = run(options, then=track if args.track else None)
    result["checkpoint"] = given
    return result


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("python -m megl_ray.evaluate", main))

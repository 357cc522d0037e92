"""Convert a dataset into validated Parquet shards plus ``dataset.json``.

    python -m megl_ray.data.convert SRC DST [--format auto|authors|manifest|hf|webdataset]
        [--map image=COL label=COL rationale=COL[,COL] mask=COL split=COL id=COL] [--classes FILE]
        [--mask-threshold T] [--mask-size 64] [--prior-size 8] [--val-fraction 0.1] [--test-fraction 0.2]
        [--rows-per-shard 256] [--seed 0] [--max-pixels N] [--strict] [--overwrite] [--dry-run]

SRC is one of (``docs/data.md`` has a minimal example of each, every field and every rejection reason): a folder in
the MEGL authors' layout (``exp_annotation.json``, ``label_class_id_mapping.json`` and the images/masks they name);
an image folder's CSV or JSON Lines manifest; a Hugging Face dataset (a ``save_to_disk`` folder or Parquet files);
WebDataset ``.tar`` shards. Masks may be ``.npy`` files, PNG/JPEG images, COCO RLE or COCO polygons. ``--dry-run``
validates everything and prints the report without writing (DST may then be left out).
DST is a local folder or ``s3://bucket/prefix``; it receives ``<split>/part-NNNNN.parquet``, ``rejected.jsonl`` and,
last (so that its presence marks a finished conversion), ``dataset.json``. Everything is first written under a
staging prefix inside DST and moved into place only once the conversion succeeded: a failed or interrupted run
leaves the previous dataset as it was. DST must be empty, new, or hold a converted dataset (replaced only with
``--overwrite``, and then only its own files); it can never be SRC or overlap it.

Every problem becomes one ``rejected.jsonl`` line with a stable ``reason`` code and is counted in the summary; the
run goes on (``--strict`` stops at the first one instead). Records stream through one at a time and shards are
written as they fill, so memory holds at most one shard's encoded bytes per split, never decoded images.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, options_from, run_cli, setup_logging
from megl_ray.data.conversion import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    STAGING_PREFIX,
    ConvertOptions,
    assign_split,
    convert,
    shuffled_records,
)
from megl_ray.data.sources import FIELDS, FORMATS

__all__ = ["STAGING_PREFIX", "ConvertOptions", "assign_split", "build_parser", "convert", "main", "shuffled_records"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (see the module docstring)."""
    p = ArgumentParser(prog="python -m megl_ray.data.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="the dataset: authors' folder, CSV/JSONL manifest, HF dataset, WebDataset shards")
    p.add_argument("dst", nargs="?", help="output: local folder or s3://bucket/prefix (optional with --dry-run)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="the input form (default: auto)")
    p.add_argument(
        "--map",
        nargs="+",
        default=[],
        action="extend",
        metavar="KEY=COLUMN",
        help=f"the column of each field ({', '.join(FIELDS)}); rationale may name several, comma-separated",
    )
    p.add_argument("--classes", help="class names: a {name: id} JSON file, or one name per line in id order")
    p.add_argument(
        "--mask-threshold", type=float, help="binarise image masks at this fraction of 255 (default: soft masks)"
    )
    p.add_argument("--dry-run", action="store_true", help="validate and report; write nothing")
    p.add_argument("--mask-size", type=int, default=64, help="side of the stored uint8 masks (default 64)")
    p.add_argument("--prior-size", type=int, default=8, help="side of the spatial prior in dataset.json (default 8)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of unsplit images put in val")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of unsplit images put in test")
    p.add_argument("--rows-per-shard", type=int, default=256, help="rows per Parquet file (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split hash (default 0)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest width*height accepted, checked before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"largest image or mask file accepted, checked before reading (default {DEFAULT_MAX_BYTES})",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first problem instead of recording it")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at DST")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``), convert, return the summary dict."""
    args = build_parser().parse_args(argv)
    return convert(options_from(ConvertOptions, args, map=tuple(args.map)))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("megl_ray.data.convert", main))

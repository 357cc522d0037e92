"""``python -m megl_ray.export --merge SRC DST``: rewrite a megl_ray export as a standalone one (LoRA adapters merged
into the base weights by peft, every tensor written, loadable without the base checkpoints) with ``DST/vlm/``, the
LLaVA for transformers alone (``LlavaForConditionalGeneration`` + ``AutoProcessor``; ``--dtype``, bf16 by default).
The last stdout line is one JSON object (see ``megl_ray.model.export_io`` and ``hf_export`` for the layout)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, add_base_path_argument, run_cli, setup_logging
from megl_ray.storage.embedded_home import embedded_store_for


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.export", description="Rewrite a megl_ray export.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--merge",
        action="store_true",
        help="merge LoRA adapters into the base weights and write a standalone export (with vlm/)",
    )
    mode.add_argument(
        "--from-checkpoint",
        action="store_true",
        help="SRC is a training checkpoint of a run (any one it kept): write its export",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="bfloat16",
        help="dtype of vlm/, the transformers LLaVA (default bfloat16; the standalone export stays float32)",
    )
    add_base_path_argument(p)
    p.add_argument("src", help="export directory (local or s3://)")
    p.add_argument("dst", help="where to write the standalone export (local or s3://)")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # The embedded store of $MEGL_HOME is served again when the URIs point into it (the default run's checkpoints)
    with embedded_store_for(args.src, args.dst):
        if args.from_checkpoint:
            # Lazy: DeepSpeed (its checkpoint converter), torch and transformers load once the arguments are understood
            from megl_ray.training.checkpoint_export import export_checkpoint  # noqa: PLC0415

            return export_checkpoint(args.src, args.dst)
        # Lazy: torch, transformers and peft load only once the arguments are understood (`--help` answers at once).
        from megl_ray.model.export_merge import merge_export  # noqa: PLC0415

        return merge_export(args.src, args.dst, vlm_dtype=args.dtype, base_path=tuple(args.base_path))


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("megl_ray.export", main))

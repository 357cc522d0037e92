"""``python -m megl_ray.train_local``: train MEGL in one process, without Ray or DeepSpeed.

The reference the distributed trainer is checked against (same data order, same losses), and the quickest way to
try a config on a laptop. With no arguments it trains the tiny preset on the bundled sample dataset. Logs go to
stderr; the last stdout line is one JSON object with the final metrics.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.config import load_config, packaged_config


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.train_local", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the packaged tiny config)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument("--export", help="write the trained model here (local dir or s3://) for evaluate/explain")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config or packaged_config("tiny"), args.overrides)
    # Lazy: torch and the model code load only once the config is valid (`--help` and config errors answer at once).
    from megl_ray.training.local import train  # noqa: PLC0415

    return train(cfg, args.max_steps, args.export)


if __name__ == "__main__":
    setup_logging()
    sys.exit(run_cli("megl_ray.train_local", main))

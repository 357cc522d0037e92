"""``python -m megl_ray.train``: train MEGL with Ray Train + DeepSpeed ZeRO, data streamed by Ray Data from S3.

    python -m megl_ray.train                                   # the embedded default, on this machine
    python -m megl_ray.train --config r18-qwen2-0.5b data.uri=s3://b/ds run.storage_path=s3://b/runs
    ray job submit --address http://HEAD:8265 -- python -m megl_ray.train --config ...

With no storage and no data given it starts an embedded SeaweedFS S3 server, uploads the bundled sample dataset and
keeps the runs there. Without ``run.name`` every invocation is a new run; re-running with the same ``run.name`` and
configuration resumes from the latest checkpoint (or, when complete, prints its result), while another configuration
under that name stops with the keys that differ (see ``megl_ray.driver.run_identity``). Progress goes to
stderr; the last stdout line is ``result.json`` as one JSON object (also written to the run directory).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.config import load_config, packaged_config, preset_names
from megl_ray.config.reference import config_reference


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.train", description=__doc__.split("\n\n")[0], epilog=config_reference())
    p.add_argument(
        "--config", help=f"YAML config, or a packaged preset by name ({', '.join(preset_names())}; default tiny)"
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key; YAML on stderr, JSON as the last stdout line) and exit",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve data, storage, the run directory, cluster resources and the memory per worker, then exit "
        "(no Ray started, no step taken)",
    )
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started here)")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show Ray's, Ray Data's and DeepSpeed's own logs (and our debug logs)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3 run.name=exp1")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config or packaged_config("tiny"), args.overrides)  # a config error answers at once
    if args.print_config:
        print(cfg.to_yaml(), file=sys.stderr, end="")
        return cfg.to_dict()
    if args.dry_run:
        # Lazy, as the driver below: Ray and torch load only once the arguments are understood.
        from megl_ray.driver.dry_run import dry_run  # noqa: PLC0415

        return dry_run(cfg, args.address, args.config, tuple(args.overrides), args.verbose)
    # Lazy: Ray, torch and DeepSpeed load only once the arguments are understood (`--help` answers at once).
    from megl_ray.driver.fit import TrainOptions, run  # noqa: PLC0415

    return run(
        TrainOptions(config=args.config, overrides=tuple(args.overrides), address=args.address, verbose=args.verbose)
    )


if __name__ == "__main__":
    setup_logging(verbose=False)  # until the flags are parsed (the driver configures its console then)
    sys.exit(run_cli("megl_ray.train", main))

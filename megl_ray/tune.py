"""``python -m megl_ray.tune``: sweep the MEGL loss weights (or any config key) with Ray Tune over Ray Train runs.

    python -m megl_ray.tune --space loss_weights                                # the embedded default, this machine
    python -m megl_ray.tune --space loss_weights_lr --config my.yaml --num-samples 16 \\
        data.uri=s3://b/ds run.storage_path=s3://b/runs

Each trial trains the base config (``--config`` plus ``key=value`` overrides) with the trial's values of the space
(see ``megl_ray.tuning.space``; the packaged spaces are in ``megl_ray/config/spaces/``) as a Ray Train run named
``<sweep>-<trial id>`` on the run storage; every epoch's validation metric goes to Tune, whose ASHA scheduler stops
the weak trials early. The experiment is kept at ``<run.storage_path>/<sweep>``: re-running the same command
resumes it (finished trials are not run again; an interrupted trial resumes from its last checkpoint). At the end
the results table goes to stderr and, with the best trial's config as YAML for ``python -m megl_ray.train
--config``, next to the experiment; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from megl_ray.cli import ArgumentParser, run_cli, setup_logging
from megl_ray.config.packaged import space_names
from megl_ray.config.reference import config_reference
from megl_ray.tuning.options import METRICS, SweepOptions

# Names a sweep started before megl_ray 0.2 pickled by this module's path (Tune's experiment state holds the trial
# function and the trial-name creator): resolved lazily here so that such a sweep resumes. Remove after one release.
_MOVED = {"run_trial": "run_trial", "_trial_name": "trial_name"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        # Lazy: importing the sweep imports Ray Tune, which `--help` and config errors never need.
        from megl_ray.tuning import sweep  # noqa: PLC0415

        return getattr(sweep, _MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.tune", description=__doc__.split("\n\n")[0], epilog=config_reference())
    p.add_argument(
        "--space", required=True, help=f"search space YAML, or a packaged space by name ({', '.join(space_names())})"
    )
    p.add_argument("--config", help="base config YAML (default: the packaged tiny config)")
    p.add_argument(
        "--num-samples",
        type=int,
        help="samples drawn from the space; grids are crossed with each (default: 1 for an all-grid space, else 4)",
    )
    p.add_argument(
        "--scheduler",
        choices=("asha", "fifo"),
        default="asha",
        help="asha: stop weak trials early (default); fifo: run every trial to the end",
    )
    p.add_argument("--metric", default="val_accuracy", help=f"metric to optimise, one of {', '.join(METRICS)}")
    p.add_argument("--mode", choices=("max", "min"), help="default: max for val_* metrics, else min")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs (default 1)")
    p.add_argument(
        "--reduction-factor",
        type=float,
        default=2.0,
        help="ASHA: 1/fraction of trials kept at each rung (default 2: the better half)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        help="at most this many trials at once (default and upper limit: as many as the cluster's CPUs/GPUs fit)",
    )
    p.add_argument("--name", help="sweep name; re-running with the same name resumes it (default: sweep-<space>)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started here)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's, Ray Data's and DeepSpeed's logs")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=5")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between options
    options = SweepOptions(
        space=args.space,
        config=args.config,
        overrides=tuple(args.overrides),
        num_samples=args.num_samples,
        scheduler=args.scheduler,
        metric=args.metric,
        mode=args.mode,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        max_concurrent=args.max_concurrent,
        name=args.name,
        address=args.address,
        verbose=args.verbose,
    )
    # Lazy: Ray Tune, Ray Train and torch load only once the arguments are understood.
    from megl_ray.tuning.sweep import run  # noqa: PLC0415

    return run(options)


if __name__ == "__main__":
    setup_logging(verbose=False)  # until the flags are parsed (the sweep configures its console then)
    sys.exit(run_cli("megl_ray.tune", main))

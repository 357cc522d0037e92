"""What a training run prints: our progress and results, warnings and errors — not Ray's, DeepSpeed's or Ray Data's
routine chatter, which comes back with ``--verbose``.

Each library is quietened with its own switch where it has one: ``ray.init(logging_config=ray.LoggingConfig)``
(root and ``ray`` loggers of every task and actor of the job), Ray Train's ``RunConfig(logging_config=...)``,
``DataContext.print_on_execution_start`` / ``enable_progress_bars``, the ``DeepSpeed`` and ``botocore`` loggers, and
``PYTHONWARNINGS`` for library deprecation notices. What Ray's own actors print regardless (Ray Data's
SplitCoordinator, the raylet's advisories) is dropped on the driver by a filter on the lines ``log_to_driver``
forwards, which matches only the known routine messages below: anything else — every warning, error and
traceback — is printed as before.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import Any

import ray
from ray.data import DataContext
from ray.train import LoggingConfig

from megl_ray.cli import setup_logging

log = logging.getLogger("megl_ray.train")

# Loggers whose INFO lines are routine (credentials found, kernels built, checkpoints written).
CHATTY_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "DeepSpeed",
    "deepspeed",
    "ray",
    "ray.data",
    "ray.train",
    "ray.tune",
    "torch.distributed",
    "megl_ray.data.convert",
    "filelock",
)

# Lines Ray's processes print at INFO (or as advisories) whatever their loggers are set to. Matched on the driver.
ROUTINE_LINES = re.compile(
    "|".join(
        [
            r"Checkpoint successfully created",  # Ray Train, every rank, every report
            r"Reporting training result \d+",  # Ray Train, every rank, every report
            r"Starting execution of Dataset|Execution plan of Dataset|Dataset \S+ execution (finished|failed) in",
            r"Progress bars (for operators )?disabled",  # Ray Data: we turned them off on purpose
            r"\[mutex\.cc : \d+\] RAW:",  # absl mutex debug output of a Ray process
            r"PYTHON worker processes have been started on node",  # raylet advisory: fractional CPUs are by design
            r"has constructor arguments in the object store and max_restarts > 0",
            r"Requesting resources: |Attempting to start training worker group|Started training worker group|"
            r"^- \(ip=\S+, pid=\d+\) world_rank=|Setting up process group for",  # Ray Train controller start-up
            r"DeepSpeed \S+ built successfully|Using \S+ as PyTorch extensions root|Loading extension module",
        ]
    )
)
# Routine messages that come with a traceback, dropped with it: Ray Train's autoscaling client on a busy machine,
# which Ray itself calls safe to ignore when transient.
ROUTINE_WITH_TRACEBACK = re.compile(r"Failed to send resource request for \S+\. If this only happens transiently")
TRACEBACK_LINE = re.compile(r"^(Traceback \(most recent call last\):|\s+\S|[\w.]+(Error|Exception|Timeout)\b)")


def drop_routine(lines: list[str]) -> list[str]:
    """``lines`` without the routine ones (and the traceback of one that comes with it)."""
    kept, dropping = [], False
    for line in lines:
        if ROUTINE_WITH_TRACEBACK.search(line):
            dropping = True
        elif ROUTINE_LINES.search(line):
            dropping = False
        elif not (dropping and TRACEBACK_LINE.match(line)):
            dropping = False
            kept.append(line)
    return kept


def quiet_env(verbose: bool) -> dict[str, str]:
    """Environment for the Ray processes this driver starts (a local Ray inherits it): deprecation notices of
    libraries are for their developers, not for someone training a model."""
    if verbose:
        return {}
    return {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


def configure_driver(verbose: bool) -> None:
    """Logging of the driver process: ours at INFO (DEBUG with --verbose), the libraries' at WARNING.

    Called again after ``ray.init``, whose logging config also reconfigures the driver's root logger."""
    setup_logging(verbose)
    if not verbose:
        _quiet_libraries()


def _quiet_libraries() -> None:
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Progress bars disabled": we disabled them on purpose (the progress display is ours).
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def ray_init_options(verbose: bool) -> dict[str, Any]:
    """``ray.init`` keyword arguments: the job's logging config (root and ``ray`` loggers of its workers)."""
    return {"logging_config": ray.LoggingConfig(log_level="INFO" if verbose else "WARNING"), "log_to_driver": True}


def train_logging_config(verbose: bool) -> Any:
    """Ray Train's own ``ray.train`` logs (controller and workers)."""
    return LoggingConfig(log_level="INFO" if verbose else "WARNING")


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's per-execution plan lines and progress bars off (its datasets carry this context to the workers)."""
    ctx = DataContext.get_current()
    ctx.print_on_execution_start = verbose
    ctx.enable_progress_bars = False  # the training progress display is ours; Ray Data's would interleave with it
    ctx.enable_auto_log_stats = False
    if not verbose:
        _quiet_libraries()  # importing ray.data configured its loggers anew


def filter_forwarded_logs(verbose: bool) -> bool:
    """Drop the known routine lines among those the driver prints for Ray's processes (what ``log_to_driver``
    forwards and the raylet's messages); returns whether the filter is on. Call it before ``ray.init``.

    Ray offers no public hook for this: its ``print_to_stdstream``, through which both kinds of lines go, is wrapped.
    If Ray's internals differ, nothing is filtered (the run prints more, never less)."""
    if verbose:
        return False
    try:
        # Lazy and guarded: a private Ray module, which another Ray release may move (then nothing is filtered).
        from ray._private import worker  # noqa: PLC0415
    except ImportError:
        return False
    inner = getattr(worker, "print_to_stdstream", None)
    if inner is None:
        return False
    if getattr(inner, "_megl_filtered", False):
        return True

    def print_to_stdstream(data: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        lines = drop_routine(data.get("lines", []))
        if lines:
            inner({**data, "lines": lines}, *args, **kwargs)

    print_to_stdstream._megl_filtered = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream
    return True


def configure_worker(verbose: bool, rank: int, use_gpu: bool) -> None:
    """Logging of a training worker: our warnings and errors (INFO too with --verbose), not the libraries' INFO."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        force=True,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
    )
    if verbose:
        return
    logging.getLogger().setLevel(logging.WARNING)  # DeepSpeed's op builders log through the root logger
    logging.getLogger("megl_ray").setLevel(logging.INFO)
    _quiet_libraries()
    if not use_gpu:  # "No CUDA runtime is found": expected on a CPU run, and said once per worker
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        # Lazy: DeepSpeed picks its accelerator when imported, so only workers (their environment set) import it.
        from deepspeed.utils import logger as ds_logger  # noqa: PLC0415

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass

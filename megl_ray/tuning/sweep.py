"""The sweep itself: Ray Tune over Ray Train runs, one trial per point of the search space, ASHA stopping the weak
trials early; resumable by name (see ``megl_ray.tune`` for the command)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler

from megl_ray import storage
from megl_ray.cluster.credentials import (
    INHERIT_VAR,
    credentials_file,
    keep_tune_from_logging_credentials,
    load_credentials,
    public_env,
)
from megl_ray.cluster.ray_env import local_ray_undone
from megl_ray.config import MEGLConfig
from megl_ray.data.schema import load_dataset_info
from megl_ray.driver.embedded import embedded_default
from megl_ray.driver.fit import fit
from megl_ray.driver.ray_session import check_resources, run_storage, start_ray
from megl_ray.errors import UserError
from megl_ray.reporting.console import configure_driver
from megl_ray.storage.uri import run_uri
from megl_ray.tuning.hooks import InterruptAfter, ResumableASHA
from megl_ray.tuning.options import METRICS, SweepOptions
from megl_ray.tuning.report import report, trial_rows
from megl_ray.tuning.settings import (
    ASHA_STATE_FILE,
    DATA_HEADROOM_CPU,
    SWEEP_FILE,
    TRIAL_DRIVER_RESOURCES,
    SweepSettings,
    settings_from,
)
from megl_ray.tuning.space import apply_values

log = logging.getLogger("megl_ray.tune")


# ------------------------------------------------------------------------------------------------ one trial


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    sweep: str,
    keys: list[str],
    env: dict[str, str],
    cwd: str,
    verbose: bool = False,
    credentials: str | None = None,
) -> None:
    """A Tune trial: the base config with the trial's values, trained as the Ray Train run ``<sweep>-<trial id>``.

    Its workers' per-epoch reports reach Tune through ``TuneReportCallback``; when ASHA stops the trial, Ray ends
    this process and, with it, the Train run it owns. Re-running a trial resumes its Train run from its checkpoint."""
    os.environ.update(env)  # S3 endpoint, as the sweep's driver has it (never credentials: Tune stores this)
    load_credentials(credentials)  # what this trial's environment lacks, from the sweep's 0600 file
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they meant where the sweep was started
    trial_id = tune.get_context().get_trial_id()
    values = {key: config[key.split(".", 1)[0]][key.split(".", 1)[1]] for key in keys}
    cfg = apply_values(base, values)
    sample_log = cfg.train.sample_log_dir and str(Path(cfg.train.sample_log_dir) / trial_id)
    # One MLflow experiment / W&B group per sweep, one tracked run per trial.
    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"{sweep}-{trial_id}", experiment=cfg.run.experiment or sweep),
        train=dataclasses.replace(cfg.train, sample_log_dir=sample_log),
    )
    logging.getLogger("megl_ray.tune").info("trial %s: %s", trial_id, values)
    fit(cfg, callbacks=[TuneReportCallback()], evaluate_test=False, verbose=verbose, console=False)


def trial_name(trial: Any) -> str:
    return trial.trial_id  # no timestamps: the names (and directories) are stable across resumes


# ------------------------------------------------------------------------------------------------ the sweep


def max_concurrent_trials(resources: dict[str, float], cfg: MEGLConfig, use_gpu: bool) -> int:
    """Trials that fit the cluster at once, so none waits forever for workers that cannot be placed.

    A trial needs ``num_workers`` GPUs (Ray Train asks no CPU for a GPU worker) or ``num_workers`` ×
    ``cpus_per_worker`` CPUs, besides one CPU kept for Ray Data's tasks."""
    if use_gpu:
        return max(1, int(resources.get("GPU", 0.0) // cfg.train.num_workers))
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int((resources.get("CPU", 0.0) - DATA_HEADROOM_CPU) / need + 1e-9))


def check_cpus(resources: dict[str, float], cfg: MEGLConfig) -> None:
    """One trial on CPUs must leave a whole CPU to Ray Data (stricter than ``megl_ray.train``'s check)."""
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    cpus = resources.get("CPU", 0.0)
    if need > cpus - DATA_HEADROOM_CPU + 1e-9:
        raise UserError(
            f"train.num_workers={cfg.train.num_workers} needs {need:g} CPUs plus {DATA_HEADROOM_CPU:g} "
            f"for data, the cluster has {cpus:g} (lower train.num_workers or train.cpus_per_worker)"
        )


def _check_resumable(uri: str, settings: SweepSettings) -> None:
    """A sweep of this name that exists must have been started with the same settings (Tune resumes those)."""
    if not storage.exists(uri):
        return
    saved = json.loads(storage.read_bytes(uri))
    current = settings.fingerprint()
    changed = [k for k in current if json.dumps(saved.get(k), sort_keys=True) != json.dumps(current[k], sort_keys=True)]
    if changed:
        raise UserError(
            f"sweep '{settings.name}' exists with other settings ({', '.join(changed)} differ): re-run "
            f"it with its original arguments to resume it, or choose another --name"
        )


def sweep(
    settings: SweepSettings, resolved: MEGLConfig, address: str | None = None, verbose: bool = False
) -> dict[str, Any]:
    """Run (or resume) the sweep; ``resolved`` is the base config with data and storage filled in."""
    with credentials_file() as credentials:  # for trials that did not inherit them; removed at the end
        return _sweep(settings, resolved, address, verbose, credentials)


def _sweep(
    settings: SweepSettings, resolved: MEGLConfig, address: str | None, verbose: bool, credentials: str | None
) -> dict[str, Any]:
    started = time.monotonic()
    info = load_dataset_info(resolved.data.uri)  # fails fast, before Ray starts, on bad data or unreachable storage
    if settings.metric.startswith("val_") and not info.splits.get("val") and resolved.data.val_fraction == 0:
        others = ", ".join(m for m in METRICS if not m.startswith("val_"))
        raise UserError(
            f"--metric {settings.metric}: data.val_fraction=0 and the dataset has no val split, so "
            f"training validates nothing; choose --metric among {others}, or data.val_fraction > 0"
        )
    storage_path, filesystem = run_storage(resolved.run.storage_path)
    experiment_uri = run_uri(resolved.run.storage_path, settings.name)
    experiment_path = run_uri(storage_path, settings.name)
    _check_resumable(experiment_uri + "/" + SWEEP_FILE, settings)

    start_ray(address, verbose)
    use_gpu = resolved.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    check_resources(resolved, use_gpu)
    if not use_gpu:
        check_cpus(ray.cluster_resources(), resolved)
    fits = max_concurrent_trials(ray.cluster_resources(), resolved, use_gpu)
    concurrent = min(settings.max_concurrent or fits, fits)
    if settings.max_concurrent and settings.max_concurrent > fits:
        log.warning(
            "--max-concurrent %d lowered to %d: the trials beyond would wait for workers, or leave Ray Data "
            "no CPU and wait forever",
            settings.max_concurrent,
            fits,
        )
    storage.write_bytes(
        experiment_uri + "/" + SWEEP_FILE,
        (json.dumps(settings.fingerprint(), indent=2, sort_keys=True) + "\n").encode(),
    )

    env = public_env()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            base=resolved.to_dict(),
            sweep=settings.name,
            keys=settings.space.keys,
            env=env,
            cwd=os.getcwd(),
            verbose=verbose,
            credentials=credentials,
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if resumed:
        log.info("resuming sweep %s from %s", settings.name, experiment_uri)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        if settings.scheduler == "asha":
            scheduler = ResumableASHA(
                experiment_uri + "/" + ASHA_STATE_FILE,
                time_attr="epoch",
                max_t=resolved.train.epochs,
                grace_period=min(settings.grace_period, resolved.train.epochs),
                reduction_factor=settings.reduction_factor,
            )
        else:
            scheduler = FIFOScheduler()
        total = settings.num_samples * settings.space.grid_size()
        log.info(
            "sweep %s: %d trial(s) of %s, at most %d at once, %s scheduler on %s; experiment %s",
            settings.name,
            total,
            settings.space.source,
            concurrent,
            settings.scheduler,
            settings.metric,
            experiment_uri,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=settings.space.param_space(),
            tune_config=tune.TuneConfig(
                metric=settings.metric,
                mode=settings.mode,
                scheduler=scheduler,
                num_samples=settings.num_samples,
                max_concurrent_trials=concurrent,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                callbacks=[InterruptAfter()],
                verbose=1,
            ),
        )
    # Mid-epoch checkpoint reports (train.checkpoint_every) carry no validation metric; ASHA skips them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    keep_tune_from_logging_credentials()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: stdout is for the result line
        grid = tuner.fit()
    rows = trial_rows(grid, settings, resolved)
    return report(rows, settings, experiment_uri, resumed, started)


def run(options: SweepOptions) -> dict[str, Any]:
    """``python -m megl_ray.tune``: validate the settings, serve the embedded default where nothing else is given,
    run (or resume) the sweep."""
    configure_driver(options.verbose)
    settings = settings_from(options)
    # what a local Ray leaves in this process (token authentication, our dashboard address): see ray_env
    with embedded_default(settings.base) as resolved, local_ray_undone(("RAY_API_SERVER_ADDRESS", INHERIT_VAR)):
        try:
            return sweep(settings, resolved, options.address, options.verbose)
        finally:
            ray.shutdown()  # flush the workers' forwarded logs now, so the result is the last line of stdout

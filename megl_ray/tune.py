"""``python -m megl_ray.tune``: sweep the MEGL loss weights (or any config key) with Ray Tune over Ray Train runs.

    python -m megl_ray.tune --space tune_spaces/loss_weights.yaml              # the embedded default, this machine
    python -m megl_ray.tune --space tune_spaces/loss_weights_lr.yaml --config my.yaml --num-samples 16 \\
        data.uri=s3://b/ds run.storage_path=s3://b/runs

Each trial trains the base config (``--config`` plus ``key=value`` overrides) with the trial's values of the space
(see ``megl_ray.tune_space`` and ``tune_spaces/``) as a Ray Train run named ``<sweep>-<trial id>`` on the run
storage; every epoch's validation metric goes to Tune, whose ASHA scheduler stops the weak trials early. The
experiment is kept at ``<run.storage_path>/<sweep>``: re-running the same command resumes it (finished trials are
not run again; an interrupted trial resumes from its last checkpoint). At the end the results table goes to stderr
and, with the best trial's config as YAML for ``python -m megl_ray.train --config``, next to the experiment; the
last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

from megl_ray.cli import ArgumentParser, run_cli
from megl_ray.config import MEGLConfig, load_config, packaged_config
from megl_ray.errors import UserError
from megl_ray.safe_io import check_name
from megl_ray.training.console import configure_driver
from megl_ray.tune_space import SearchSpace, apply_values, load_space

log = logging.getLogger("megl_ray.tune")

# What the training workers report every epoch (megl_ray.training.worker): validation metrics and loss terms.
METRICS = ("val_accuracy", "val_miou", "loss", "ce", "text", "visual", "dc")
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
"""What each trial's driver function reserves: no CPU (it builds the datasets, then waits on its Train run; a CPU
share here would be missing for Ray Data), and some memory, as Tune needs a non-empty request."""
DATA_HEADROOM_CPU = 1.0
"""CPU left free for Ray Data: its file-listing task takes a whole CPU (not configurable), and every trial's
datasets list their files; with less than one CPU free they wait forever."""
SWEEP_FILE = "sweep.json"
ASHA_STATE_FILE = "asha_state.yaml"  # not .json: see ResumableASHA


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--space", required=True, help="search space YAML (see tune_spaces/)")
    p.add_argument("--config", help="base config YAML (default: the packaged tiny config)")
    p.add_argument("--num-samples", type=int, help="samples drawn from the space; grids are crossed with each "
                                                   "(default: 1 for an all-grid space, else 4)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha: stop weak trials early (default); fifo: run every trial to the end")
    p.add_argument("--metric", default="val_accuracy", help=f"metric to optimise, one of {', '.join(METRICS)}")
    p.add_argument("--mode", choices=("max", "min"), help="default: max for val_* metrics, else min")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs (default 1)")
    p.add_argument("--reduction-factor", type=float, default=2.0,
                   help="ASHA: 1/fraction of trials kept at each rung (default 2: the better half)")
    p.add_argument("--max-concurrent", type=int,
                   help="at most this many trials at once (default and upper limit: as many as the cluster's "
                        "CPUs/GPUs fit)")
    p.add_argument("--name", help="sweep name; re-running with the same name resumes it (default: sweep-<space>)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started here)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show Ray's, Ray Data's and DeepSpeed's logs")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. train.epochs=5")
    return p


@dataclasses.dataclass
class SweepSettings:
    name: str
    space: SearchSpace
    base: MEGLConfig
    """The base config as given (before the embedded default fills in data and storage)."""
    num_samples: int
    scheduler: str
    metric: str
    mode: str
    grace_period: int
    reduction_factor: float
    max_concurrent: int | None

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a re-run to resume this sweep (Tune restores the original settings)."""
        return {"space": self.space.to_dict(), "config": self.base.to_dict(), "num_samples": self.num_samples,
                "scheduler": self.scheduler, "metric": self.metric, "mode": self.mode,
                "grace_period": self.grace_period, "reduction_factor": self.reduction_factor}


def _settings(args: argparse.Namespace) -> SweepSettings:
    base = load_config(args.config or packaged_config("tiny"), args.overrides)
    space = load_space(args.space, base)
    if args.metric not in METRICS:
        raise UserError(f"--metric {args.metric}: not reported by training (valid: {', '.join(METRICS)})")
    mode = args.mode or ("max" if args.metric.startswith("val_") else "min")
    num_samples = args.num_samples if args.num_samples is not None else (1 if space.only_grid() else 4)
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    if args.grace_period < 1:
        raise UserError(f"--grace-period must be >= 1, got {args.grace_period}")
    if not (math.isfinite(args.reduction_factor) and args.reduction_factor > 1):  # NaN compares false to all
        raise UserError(f"--reduction-factor must be > 1, got {args.reduction_factor}")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    name = args.name or f"sweep-{Path(args.space).stem}"
    problem = check_name(name) or ("must not start with '.'" if name.startswith(".") else None)
    if problem:
        raise UserError(f"--name {problem}, got {name!r}")
    return SweepSettings(name, space, base, num_samples, args.scheduler, args.metric, mode, args.grace_period,
                         args.reduction_factor, args.max_concurrent)


# ------------------------------------------------------------------------------------------------ one trial


def run_trial(config: dict[str, Any], *, base: dict[str, Any], sweep: str, keys: list[str], env: dict[str, str],
              cwd: str, verbose: bool = False, credentials: str | None = None) -> None:
    """A Tune trial: the base config with the trial's values, trained as the Ray Train run ``<sweep>-<trial id>``.

    Its workers' per-epoch reports reach Tune through ``TuneReportCallback``; when ASHA stops the trial, Ray ends
    this process and, with it, the Train run it owns. Re-running a trial resumes its Train run from its checkpoint."""
    os.environ.update(env)  # S3 endpoint, as the sweep's driver has it (never credentials: Tune stores this)
    from megl_ray.training.credentials import load_credentials

    load_credentials(credentials)  # what this trial's environment lacks, from the sweep's 0600 file
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the config mean what they meant where the sweep was started
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from megl_ray.train import fit

    trial_id = tune.get_context().get_trial_id()
    values = {key: config[key.split(".", 1)[0]][key.split(".", 1)[1]] for key in keys}
    cfg = apply_values(base, values)
    sample_log = cfg.train.sample_log_dir and str(Path(cfg.train.sample_log_dir) / trial_id)
    # One MLflow experiment / W&B group per sweep, one tracked run per trial.
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{sweep}-{trial_id}",
                                                           experiment=cfg.run.experiment or sweep),
                              train=dataclasses.replace(cfg.train, sample_log_dir=sample_log))
    logging.getLogger("megl_ray.tune").info("trial %s: %s", trial_id, values)
    fit(cfg, callbacks=[TuneReportCallback()], evaluate_test=False, verbose=verbose, console=False)


def _trial_name(trial: Any) -> str:
    return trial.trial_id  # no timestamps: the names (and directories) are stable across resumes


# ------------------------------------------------------------------------------------------------ the sweep


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray exactly as ``megl_ray.train`` does (its
    dashboard named through ``RAY_API_SERVER_ADDRESS``, which Ray Train's placement-group cleaner needs to free the
    workers of a trial that ASHA stopped when this machine runs more than one Ray instance)."""
    from megl_ray.train import _start_ray

    _start_ray(address, verbose)


def max_concurrent_trials(resources: dict[str, float], cfg: MEGLConfig, use_gpu: bool) -> int:
    """Trials that fit the cluster at once, so none waits forever for workers that cannot be placed.

    A trial needs ``num_workers`` GPUs (Ray Train asks no CPU for a GPU worker) or ``num_workers`` ×
    ``cpus_per_worker`` CPUs, besides one CPU kept for Ray Data's tasks."""
    if use_gpu:
        return max(1, int(resources.get("GPU", 0.0) // cfg.train.num_workers))
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int((resources.get("CPU", 0.0) - DATA_HEADROOM_CPU) / need + 1e-9))


def _check_cpus(resources: dict[str, float], cfg: MEGLConfig) -> None:
    """One trial on CPUs must leave a whole CPU to Ray Data (stricter than ``megl_ray.train``'s check)."""
    need = cfg.train.num_workers * cfg.train.cpus_per_worker
    cpus = resources.get("CPU", 0.0)
    if need > cpus - DATA_HEADROOM_CPU + 1e-9:
        raise UserError(f"train.num_workers={cfg.train.num_workers} needs {need:g} CPUs plus {DATA_HEADROOM_CPU:g} "
                        f"for data, the cluster has {cpus:g} (lower train.num_workers or train.cpus_per_worker)")


def _check_resumable(uri: str, settings: SweepSettings) -> None:
    """A sweep of this name that exists must have been started with the same settings (Tune resumes those)."""
    from megl_ray import storage

    if not storage.exists(uri):
        return
    saved = json.loads(storage.read_bytes(uri))
    current = settings.fingerprint()
    changed = [k for k in current if json.dumps(saved.get(k), sort_keys=True) != json.dumps(current[k], sort_keys=True)]
    if changed:
        raise UserError(f"sweep '{settings.name}' exists with other settings ({', '.join(changed)} differ): re-run "
                        f"it with its original arguments to resume it, or choose another --name")


def sweep(settings: SweepSettings, resolved: MEGLConfig, address: str | None = None,
          verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; ``resolved`` is the base config with data and storage filled in."""
    from megl_ray.training.credentials import credentials_file

    with credentials_file() as credentials:  # for trials that did not inherit them; removed at the end
        return _sweep(settings, resolved, address, verbose, credentials)


def _sweep(settings: SweepSettings, resolved: MEGLConfig, address: str | None, verbose: bool,
           credentials: str | None) -> dict[str, Any]:
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from megl_ray import storage
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.train import _check_resources, _run_uri, _storage
    from megl_ray.tune_hooks import InterruptAfter, ResumableASHA

    started = time.monotonic()
    info = load_dataset_info(resolved.data.uri)  # fails fast, before Ray starts, on bad data or unreachable storage
    if settings.metric.startswith("val_") and not info.splits.get("val") and resolved.data.val_fraction == 0:
        others = ", ".join(m for m in METRICS if not m.startswith("val_"))
        raise UserError(f"--metric {settings.metric}: data.val_fraction=0 and the dataset has no val split, so "
                        f"training validates nothing; choose --metric among {others}, or data.val_fraction > 0")
    storage_path, filesystem = _storage(resolved.run.storage_path)
    experiment_uri = _run_uri(resolved.run.storage_path, settings.name)
    experiment_path = storage_path.rstrip("/") + "/" + settings.name
    _check_resumable(experiment_uri + "/" + SWEEP_FILE, settings)

    start_ray(address, verbose)
    use_gpu = resolved.train.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    _check_resources(resolved, use_gpu)
    if not use_gpu:
        _check_cpus(ray.cluster_resources(), resolved)
    fits = max_concurrent_trials(ray.cluster_resources(), resolved, use_gpu)
    concurrent = min(settings.max_concurrent or fits, fits)
    if settings.max_concurrent and settings.max_concurrent > fits:
        log.warning("--max-concurrent %d lowered to %d: the trials beyond would wait for workers, or leave Ray Data "
                    "no CPU and wait forever", settings.max_concurrent, fits)
    storage.write_bytes(experiment_uri + "/" + SWEEP_FILE,
                        (json.dumps(settings.fingerprint(), indent=2, sort_keys=True) + "\n").encode())

    from megl_ray.training.credentials import public_env

    env = public_env()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=resolved.to_dict(), sweep=settings.name, keys=settings.space.keys,
                             env=env, cwd=os.getcwd(), verbose=verbose, credentials=credentials),
        TRIAL_DRIVER_RESOURCES)
    resumed = tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if resumed:
        log.info("resuming sweep %s from %s", settings.name, experiment_uri)
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=filesystem)
    else:
        if settings.scheduler == "asha":
            scheduler = ResumableASHA(experiment_uri + "/" + ASHA_STATE_FILE, time_attr="epoch",
                                      max_t=resolved.train.epochs,
                                      grace_period=min(settings.grace_period, resolved.train.epochs),
                                      reduction_factor=settings.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        total = settings.num_samples * settings.space.grid_size()
        log.info("sweep %s: %d trial(s) of %s, at most %d at once, %s scheduler on %s; experiment %s",
                 settings.name, total, settings.space.source, concurrent, settings.scheduler, settings.metric,
                 experiment_uri)
        tuner = tune.Tuner(
            trainable, param_space=settings.space.param_space(),
            tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                        num_samples=settings.num_samples, max_concurrent_trials=concurrent,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=settings.name, storage_path=storage_path, storage_filesystem=filesystem,
                                      callbacks=[InterruptAfter()], verbose=1))
    # Mid-epoch checkpoint reports (train.checkpoint_every) carry no validation metric; ASHA skips them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    from megl_ray.training.credentials import keep_tune_from_logging_credentials

    keep_tune_from_logging_credentials()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: stdout is for the result line
        grid = tuner.fit()
    rows = _rows(grid, settings, resolved)
    return _report(rows, settings, experiment_uri, resumed, started)


def _status(trial_status: str, epochs: int | None, planned: int) -> str:
    if trial_status == "TERMINATED":
        return "completed" if (epochs or 0) >= planned else "early-stopped"
    if trial_status == "ERROR":
        return "error"
    return trial_status.lower()  # pending, running, paused: the sweep was interrupted


def _number(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def _rows(grid: Any, settings: SweepSettings, resolved: MEGLConfig) -> list[dict[str, Any]]:
    """One row per trial: id, the swept values, the last reported metric, epochs run, status, run directory."""
    trials = getattr(getattr(grid, "_experiment_analysis", None), "trials", None)  # with their status
    if trials is None:  # not expected: the public results lack the status of unfinished trials
        trials = [SimpleNamespace(trial_id=r.metrics.get("trial_id") or Path(r.path).name, config=r.config or {},
                                  status="ERROR" if r.error else "TERMINATED", last_result=r.metrics or {})
                  for r in grid]
    rows = []
    for trial in sorted(trials, key=lambda t: t.trial_id):
        result = trial.last_result or {}
        epochs = result.get("epoch")
        rows.append({
            "trial": trial.trial_id,
            **settings.space.values(trial.config),
            settings.metric: _number(result.get(settings.metric)),
            "epochs": int(epochs) if epochs is not None else 0,
            "status": _status(trial.status, epochs, resolved.train.epochs),
            "run": _run_uri_of(resolved, f"{settings.name}-{trial.trial_id}"),
        })
    return rows


def _run_uri_of(resolved: MEGLConfig, name: str) -> str:
    return resolved.run.storage_path.rstrip("/") + "/" + name


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _report(rows: list[dict[str, Any]], settings: SweepSettings, experiment_uri: str, resumed: bool,
            started: float) -> dict[str, Any]:
    from megl_ray import storage

    columns = ["trial", *settings.space.keys, settings.metric, "epochs", "status"]
    sign = 1 if settings.mode == "max" else -1
    scored = [r for r in rows if r[settings.metric] is not None and r["status"] != "error"]
    best = max(scored, key=lambda r: sign * r[settings.metric]) if scored else None
    print(f"\nsweep {settings.name}: {len(rows)} trial(s), {settings.metric} ({settings.mode})"
          + (f", best {best['trial']}" if best else "") + "\n" + format_table(rows, columns), file=sys.stderr,
          flush=True)

    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early-stopped", "error")}
    # Trials not finished, and those an interrupted sweep had not created yet.
    unfinished = max(len(rows), settings.num_samples * settings.space.grid_size()) - sum(counts.values())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*columns, "run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    results_csv = experiment_uri + "/results.csv"
    results_json = experiment_uri + "/results.json"
    storage.write_bytes(results_csv, buffer.getvalue().encode())
    best_config = best_config_uri = None
    if best is not None:
        cfg = apply_values(settings.base.to_dict(), {k: best[k] for k in settings.space.keys})
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{settings.name}-best"))
        best_config_uri = experiment_uri + "/best_config.yaml"
        text = (f"# The best trial ({best['trial']}, {settings.metric}={best[settings.metric]:.4g}, {settings.mode}) "
                f"of sweep {settings.name}; its run: {best['run']}\n"
                f"# Train it again, as run {cfg.run.name}: python -m megl_ray.train --config best_config.yaml\n"
                + cfg.to_yaml())
        storage.write_bytes(best_config_uri, text.encode())
        best_config = best_config_uri
        if storage.is_s3(best_config_uri):  # --config takes a local file: keep a copy on this machine too
            from megl_ray.training.embedded import megl_home

            best_config = str(megl_home() / "sweeps" / settings.name / "best_config.yaml")
            storage.write_bytes(best_config, text.encode())
    summary = {
        "name": settings.name, "experiment": experiment_uri, "metric": settings.metric, "mode": settings.mode,
        "trials": len(rows), "completed": counts["completed"], "early_stopped": counts["early-stopped"],
        "errored": counts["error"], "unfinished": unfinished, "resumed": resumed,
        "best_trial": best["trial"] if best else None, "best_metric": best[settings.metric] if best else None,
        "best_values": {k: best[k] for k in settings.space.keys} if best else None,
        "best_run": best["run"] if best else None, "best_config": best_config,
        "best_config_uri": best_config_uri,
        "results_csv": results_csv, "results_json": results_json, "seconds": round(time.monotonic() - started, 1),
    }
    storage.write_bytes(results_json, (json.dumps({**summary, "rows": rows}, indent=2) + "\n").encode())
    if unfinished:
        log.warning("sweep %s was interrupted with %d trial(s) unfinished: re-run the same command to resume it",
                    settings.name, unfinished)
        raise KeyboardInterrupt
    if best is None:
        raise UserError(f"sweep {settings.name}: no trial reported {settings.metric} "
                        f"({counts['error']} failed; see {results_csv})")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_intermixed_args(argv)  # key=value overrides may come between options
    configure_driver(args.verbose)
    settings = _settings(args)
    from megl_ray.training.embedded import embedded_default

    from megl_ray.training.credentials import INHERIT_VAR
    from megl_ray.training.ray_env import local_ray_undone

    # what a local Ray leaves in this process (token authentication, our dashboard address): see ray_env
    with embedded_default(settings.base) as resolved, local_ray_undone(("RAY_API_SERVER_ADDRESS", INHERIT_VAR)):
        try:
            return sweep(settings, resolved, args.address, args.verbose)
        finally:
            import ray

            ray.shutdown()  # flush the workers' forwarded logs now, so the result is the last line of stdout


if __name__ == "__main__":
    configure_driver(verbose=False)  # until the flags are parsed
    sys.exit(run_cli("megl_ray.tune", main))

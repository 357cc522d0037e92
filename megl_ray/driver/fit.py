"""The head-node side of a training run: plan it, hand the workers a typed plan, run Ray Train, then evaluate
and draw where the resources are.

``fit`` trains one resolved configuration on Ray (a Tune trial calls it too); ``run`` is what
``python -m megl_ray.train`` does around it: a run name, the embedded default, the run-identity check, a local Ray
undone afterwards. Progress goes to stderr; the result is ``result.json`` (also written to the run directory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from megl_ray import storage
from megl_ray.cluster.credentials import INHERIT_VAR, credentials_file
from megl_ray.cluster.placement import check_run_storage
from megl_ray.cluster.ray_env import local_ray_undone
from megl_ray.config import MEGLConfig, load_config, megl_home, packaged_config
from megl_ray.data.pipeline import fits_in_cache, preprocessed_bytes_per_row
from megl_ray.data.schema import load_dataset_info
from megl_ray.driver.embedded import embedded_default
from megl_ray.driver.inputs import build_datasets, cached_rows, plan_splits
from megl_ray.driver.interruption import interrupted_lines, resume_command, sigterm_interrupts
from megl_ray.driver.ray_session import check_resources, run_storage, start_ray, worker_env
from megl_ray.driver.run_identity import check_run, fresh_name, name_given
from megl_ray.errors import Interrupted, UserError
from megl_ray.model.vlm import check_model_sources, load_tokenizer, pixel_size
from megl_ray.reporting.console import configure_driver, quiet_ray_data, train_logging_config
from megl_ray.reporting.pictures import closing_lines, local_run_dir, write_pictures
from megl_ray.reporting.progress import RunMonitor
from megl_ray.reporting.tracking import Tracker
from megl_ray.storage.embedded_home import points_into_embedded
from megl_ray.storage.uri import run_uri
from megl_ray.training.accounting import planned_steps
from megl_ray.training.ds_config import global_batch_size
from megl_ray.training.entry import train_loop_per_worker
from megl_ray.training.gallery import gallery_source
from megl_ray.training.guards import DIVERGED_KEY, raise_if_diverged
from megl_ray.training.plan import WorkerPlan

log = logging.getLogger("megl_ray.train")


class TrainingFailed(UserError):
    """Ray Train gave up on the run (its workers failed more than ``train.max_failures`` times)."""


@dataclass(frozen=True)
class TrainOptions:
    """What ``python -m megl_ray.train`` was asked for."""

    config: str | None = None
    """A YAML config (default: the packaged tiny preset)."""
    overrides: tuple[str, ...] = ()
    """``key=value`` overrides applied on top of ``config``."""
    address: str | None = None
    """The Ray cluster to join (default ``$RAY_ADDRESS``, else a local Ray started here)."""
    verbose: bool = False
    """Also show Ray's, Ray Data's and DeepSpeed's own logs (and our debug logs)."""


def fit(
    cfg: MEGLConfig,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
    evaluate_test: bool = True,
    verbose: bool = False,
    console: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` (data and storage resolved) on Ray; returns the result dict.

    ``callbacks`` go to the run's ``RunConfig`` (a Tune trial passes ``TuneReportCallback()`` so that every
    report of the workers — per epoch, with ``val_accuracy`` — reaches Tune's scheduler)."""
    started = time.monotonic()
    uri = run_uri(cfg.run.storage_path, cfg.run.name)
    local_dir = local_run_dir(cfg.run.name)  # pictures and TensorBoard files, beside their copies in the run dir
    # Everything that can fail on the user's input fails here, before Ray starts: bad data, unreachable storage,
    # empty splits, a model directory that is not there.
    info = load_dataset_info(cfg.data.uri)
    splits = plan_splits(cfg, info, evaluate_test)
    train_ids = splits.train_ids
    tokenizer = load_tokenizer(cfg.model, splits.corpus + list(info.classes))
    start_ray(address, verbose)
    quiet_ray_data(verbose)
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    check_resources(cfg, use_gpu)
    check_run_storage(cfg, use_gpu, ray.nodes(), ray.get_runtime_context().get_node_id())
    row_bytes = preprocessed_bytes_per_row(
        pixel_size(cfg.model), info.mask_size, cfg.data.max_rationales, cfg.model.max_text_tokens
    )
    cache = cfg.train.cache_data
    if cache is None:
        cache = fits_in_cache(cached_rows(splits, info, evaluate_test), row_bytes)
    datasets, train_cache = build_datasets(cfg, info, tokenizer, splits, cache, evaluate_test)
    planned = planned_steps(
        len(train_ids), cfg.train.num_workers, cfg.data.batch_size, cfg.train.epochs, cfg.train.grad_accum
    )
    log.info(
        "%d train images, %d workers, global batch %d, %d optimizer steps planned, validation: %s%s",
        len(train_ids),
        cfg.train.num_workers,
        global_batch_size(cfg),
        planned,
        splits.val_source,
        " (data cached)" if cache else "",
    )

    storage_path, filesystem = run_storage(cfg.run.storage_path)
    tracker = Tracker(cfg, uri, local_dir)
    tracker.config(cfg.to_dict())
    monitor = RunMonitor(planned, tracker, display=console)
    plan = WorkerPlan(
        config=cfg.to_dict(),
        env=worker_env(use_gpu),
        tokenizer=tokenizer,
        num_classes=info.num_classes,
        classes=tuple(info.classes),
        prior=tuple(tuple(row) for row in info.prior_array().tolist()),
        train_ids=tuple(train_ids),
        use_gpu=use_gpu,
        run_uri=uri,
        has_val="val" in datasets,
        has_test="test" in datasets,
        gallery=gallery_source(splits.val_source, splits.val_ids, "test" in datasets) if evaluate_test else None,
        train_cache=train_cache,
        verbose=verbose,
        board=monitor.board,
    )
    scaling = ScalingConfig(
        num_workers=cfg.train.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=None if use_gpu else {"CPU": cfg.train.cpus_per_worker},
        placement_strategy=cfg.train.placement_strategy,
    )
    run_config = RunConfig(
        name=cfg.run.name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        # With a checkpoint metric Ray keeps the best two by it and always the latest (to resume from)
        checkpoint_config=CheckpointConfig(
            num_to_keep=2,
            checkpoint_score_attribute=cfg.run.checkpoint_metric,
            checkpoint_score_order=cfg.checkpoint_order(),
        ),
        callbacks=list(callbacks),
        logging_config=train_logging_config(verbose),
    )
    try:
        # the credentials file: for workers that did not inherit them; removed when training ends
        with monitor, credentials_file() as credentials:
            plan = dataclasses.replace(plan, credentials_file=credentials)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=plan.as_loop_config(),
                scaling_config=scaling,
                datasets=datasets,
                dataset_config=DataConfig(datasets_to_split=list(datasets)),
                run_config=run_config,
            )
            result = fit_interruptibly(trainer)
    except BaseException:
        tracker.close(success=False)
        raise
    metrics = {**(result.metrics or {}), **monitor.outcome}
    if result.error is not None or metrics.get(DIVERGED_KEY):
        tracker.close(success=False)
        if result.error is not None:
            raise TrainingFailed(f"training failed: {str(result.error).splitlines()[0]}")
        raise_if_diverged(metrics)
    scheme = "s3://" if cfg.run.storage_path.startswith("s3://") else ""
    summary = {
        "checkpoint": scheme + result.checkpoint.path if result.checkpoint else None,
        "run_dir": uri,
        "export": uri + "/export",
        "data_uri": cfg.data.uri,
        "steps": int(metrics.get("step", 0)),
        "planned_steps": planned,
        "epochs": int(metrics.get("epoch", 0)),
        "val_accuracy": _round(metrics.get("val_accuracy")),
        "val_miou": _round(metrics.get("val_miou")),
        "test_accuracy": _round(metrics.get("test_accuracy")),
        "test_miou": _round(metrics.get("test_miou")),
        **splits.summary(cfg),
        "final_loss": _round(metrics.get("loss")),
        **_best(cfg, metrics),
        # the last logged step: every micro-batch of every rank since the log before it (throughput, memory, ...)
        "last_logged": {k: _round(v) for k, v in _last_step_values(monitor.history).items()},
        "num_workers": cfg.train.num_workers,
        "zero_stage": cfg.train.zero_stage,
        "global_batch_size": global_batch_size(cfg),
    }

    def write_result() -> None:
        storage.write_bytes(uri + "/result.json", (json.dumps(summary, indent=2) + "\n").encode())

    summary["seconds"] = round(time.monotonic() - started, 1)
    write_result()  # before the pictures: a failure there loses nothing
    if evaluate_test:
        tracker.summary({"test/accuracy": metrics.get("test_accuracy"), "test/miou": metrics.get("test_miou")})
    tracker.export(summary["export"])
    if evaluate_test:  # the end-of-run report; a sweep's trials skip it
        if plan.gallery is None:
            log.info("no explanation gallery: the run has no validation or test examples")
        drawn = monitor.outcome.get("gallery")
        summary["pictures"], examples = write_pictures(
            monitor.history, uri, local_dir, f"run {cfg.run.name}", None if drawn is None else _unpack(drawn)
        )
        if "gallery" in summary["pictures"]:
            summary["pictures"]["gallery_of"] = "test" if plan.gallery.split == "test" else "validation"
        tracker.pictures(summary["pictures"], examples)
    if "tensorboard" in tracker.backends:
        summary["tensorboard"] = str(local_dir / "tensorboard")
    tracker.close(success=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    write_result()
    return summary


def _unpack(drawn: dict[str, Any]) -> Callable[[Path], list[dict[str, Any]]]:
    """What ``write_pictures`` calls to put the workers' gallery (its examples and files) into a local folder."""

    def write(folder: Path) -> list[dict[str, Any]]:
        for name, data in drawn["files"].items():
            (folder / Path(name).name).write_bytes(data)  # a bare name: the files land in ``folder`` only
        return drawn["examples"]

    return write


def fit_interruptibly(trainer: TorchTrainer) -> Any:
    """``trainer.fit()`` in a thread of its own, this one waiting: Ctrl-C (or SIGTERM) reaches this thread as
    ``KeyboardInterrupt`` and the caller unwinds (``ray.shutdown`` ends the workers). Called from the main thread,
    Ray Train installs its own SIGINT handler instead, which ends the process with ``sys.exit`` from inside the
    handler: no resume command could be printed. A Tune trial (already off the main thread) behaves the same."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="megl-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a timed join: a signal interrupts it
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _best(cfg: MEGLConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """``best_checkpoint`` (its URI, metric value, step, epoch) and ``exported_from`` (``best`` or ``last``)."""
    if not cfg.run.checkpoint_metric:
        return {"exported_from": "last"}
    best = dict(metrics.get("best_checkpoint") or {})
    exported = bool(best.pop("exported", False))
    if "value" in best:
        best["value"] = _round(best["value"])
    return {"best_checkpoint": best or None, "exported_from": "best" if exported else "last"}


def _last_step_values(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    steps = [event for event in history if event["kind"] == "step"]
    return {"step": steps[-1]["step"], **steps[-1]["values"]} if steps else {}


def _round(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def next_steps(result: dict[str, Any]) -> list[str]:
    """The commands that evaluate and explain this run's export (they reach the embedded store by themselves)."""
    export, data = result["export"], result["data_uri"]
    home = (
        f"MEGL_HOME={os.environ['MEGL_HOME']} "
        if "MEGL_HOME" in os.environ and points_into_embedded(export, data)
        else ""
    )
    out = megl_home() / "explanations" / Path(result["run_dir"]).name
    return [
        f"evaluate it: {home}python -m megl_ray.evaluate --checkpoint {export} --data {data}",
        f"explain it:  {home}python -m megl_ray.explain --checkpoint {export} --gallery --data {data} --out {out}",
    ]


def run(options: TrainOptions) -> dict[str, Any]:
    """``python -m megl_ray.train``: resolve the config, name the run, serve the embedded default where nothing
    else is given, resume or refuse an existing run of that name, train, and say what to do next."""
    configure_driver(options.verbose)
    cfg = load_config(options.config or packaged_config("tiny"), options.overrides)
    check_model_sources(cfg.model)  # a wrong hub id stops here, before the embedded store, the data or Ray
    named = name_given(options.config, options.overrides)
    if not named:  # every invocation a new run, unless a name is chosen
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=fresh_name(cfg.run.name)))
        log.info("run %s (to resume it if interrupted, re-run with run.name=%s)", cfg.run.name, cfg.run.name)
    command = resume_command(options.config, options.overrides, cfg.run.name, named)
    with embedded_default(cfg) as resolved, sigterm_interrupts():
        uri = run_uri(resolved.run.storage_path, resolved.run.name)
        complete = check_run(resolved, uri)
        if complete is not None:
            return complete
        # A local Ray leaves token authentication (and our dashboard address) in this process: undone after it,
        # so that a later run in the same process can join a cluster started without tokens.
        with local_ray_undone(("RAY_API_SERVER_ADDRESS", INHERIT_VAR)):
            try:
                result = fit(resolved, options.address, verbose=options.verbose)
            except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM: say what stopped and how to go on
                # Stop the workers before reading which checkpoint Ray registered last: the fit thread would go on
                # training (and registering) while we read, and the line would name a step the resume does not use.
                ray.shutdown()
                code = getattr(err, "exit_code", 130)
                lines = interrupted_lines(resolved.run.name, uri, "SIGTERM" if code == 143 else "SIGINT", command)
                raise Interrupted(code, lines) from None
            except TrainingFailed as err:
                raise TrainingFailed(f"{err}; resume it with: {command}") from None
            finally:
                # Flush the workers' forwarded logs now, so the result is the last line of stdout.
                ray.shutdown()
    for line in closing_lines(result.get("pictures", {}), result["run_dir"], result.get("tensorboard")):
        print(line, file=sys.stderr, flush=True)
    print("\n".join(f"[megl] {line}" for line in next_steps(result)), file=sys.stderr, flush=True)
    return result

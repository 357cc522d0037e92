"""``python -m megl_ray.train``: train MEGL with Ray Train + DeepSpeed ZeRO, data streamed by Ray Data from S3.

    python -m megl_ray.train                                   # the embedded default, on this machine
    python -m megl_ray.train --config megl_ray/configs/r18-qwen2-0.5b.yaml data.uri=s3://b/ds run.storage_path=s3://b/runs
    ray job submit --address http://HEAD:8265 -- python -m megl_ray.train --config ...

With no storage and no data given it starts an embedded SeaweedFS S3 server, uploads the bundled sample dataset and
keeps the runs there. Without ``run.name`` every invocation is a new run; re-running with the same ``run.name`` and
configuration resumes from the latest checkpoint (or, when complete, prints its result), while another configuration
under that name stops with the keys that differ (see ``megl_ray.training.run_identity``). Progress goes to
stderr; the last stdout line is ``result.json`` as one JSON object (also written to the run directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from megl_ray.cli import ArgumentParser, run_cli
from megl_ray.config import MEGLConfig, load_config, packaged_config
from megl_ray.errors import UserError
from megl_ray.training.console import configure_driver

log = logging.getLogger("megl_ray.train")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m megl_ray.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: the packaged tiny config)")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray started here)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show Ray's, Ray Data's and DeepSpeed's own logs (and our debug logs)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=3 run.name=exp1")
    return p


def _run_uri(storage_path: str, name: str) -> str:
    return storage_path.rstrip("/") + "/" + name


def _start_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    from megl_ray.training.console import filter_forwarded_logs, quiet_env, ray_init_options

    if ray.is_initialized():
        return
    from megl_ray.training.credentials import INHERIT_VAR

    address = address or os.environ.get("RAY_ADDRESS")
    filter_forwarded_logs(verbose)
    os.environ.pop(INHERIT_VAR, None)
    if address:
        ray.init(address=address, **ray_init_options(verbose))
        configure_driver(verbose)
        return
    from megl_ray.training.ray_env import worker_pool_env

    for key, value in {**quiet_env(verbose), **worker_pool_env()}.items():  # inherited by the local Ray's processes
        os.environ.setdefault(key, value)
    # A local Ray: every core, bound to loopback, temp dir short (unix socket paths are limited to ~107 bytes).
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    # The dashboard stays on (loopback only): Ray Train's controller is watched through its state API. Its port is
    # our own and named explicitly, so clean-up finds this instance even when other Ray instances share the machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    os.environ[INHERIT_VAR] = "1"  # its processes inherit this environment, credentials included
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             _temp_dir=temp, _node_ip_address="127.0.0.1", **ray_init_options(verbose))
    configure_driver(verbose)
    log.info("started a local Ray (%d CPUs), temp dir %s, dashboard port %d", os.cpu_count(), temp, port)


def _check_resources(cfg: MEGLConfig, use_gpu: bool) -> None:
    import ray

    resources = ray.cluster_resources()
    if use_gpu:
        gpus = resources.get("GPU", 0)
        if cfg.train.num_workers > gpus:
            raise UserError(f"train.num_workers={cfg.train.num_workers} needs {cfg.train.num_workers} GPUs, "
                            f"the cluster has {gpus:g}: set train.num_workers={int(gpus)} or fewer, "
                            "or train.use_gpu=false to train on CPUs")
    else:
        need = cfg.train.num_workers * cfg.train.cpus_per_worker
        cpus = resources.get("CPU", 0)
        if need > cpus - 1.0:  # Ray Data's file-listing task takes a whole CPU: without it the run waits forever
            raise UserError(f"train.num_workers={cfg.train.num_workers} needs {need:g} CPUs plus 1 for data, "
                            f"the cluster has {cpus:g} (lower train.num_workers or train.cpus_per_worker)")


def _storage(storage_path: str):
    """(RunConfig storage_path, filesystem): a path without scheme plus a pyarrow filesystem, as Ray Train needs."""
    from megl_ray import storage

    if storage.is_s3(storage_path):  # Ray Train/Tune keep it in their state: no credentials inside if possible
        from megl_ray.training.credentials import workers_inherit_env

        fs, path = storage.pyarrow_filesystem(storage_path, embed_credentials=not workers_inherit_env())
        return path, fs
    Path(storage_path).mkdir(parents=True, exist_ok=True)
    return str(Path(storage_path).resolve()), None


def _worker_env(use_gpu: bool) -> dict[str, str]:
    """What the workers need in their environment besides what they inherit, credentials left out (see
    ``megl_ray.training.credentials``)."""
    from megl_ray.training.credentials import public_env
    from megl_ray.training.embedded import megl_home

    env = public_env()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    # DeepSpeed JIT-compiles a kernel on first use (~1 min on 2 cores): keep it between runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(megl_home() / "torch_extensions"))
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def evaluate_test_split(export_uri: str, data_uri: str) -> dict[str, float | None]:
    """Accuracy and mIoU of the export's classifier on the test split, in this process (see
    ``megl_ray.training.post_eval``; ``fit`` runs it as a Ray task where the training resources are)."""
    from megl_ray.training.post_eval import evaluate_test_split as classifier_only

    return classifier_only(export_uri, data_uri)


def fit(cfg: MEGLConfig, address: str | None = None, callbacks: Sequence[Any] = (),
        evaluate_test: bool = True, verbose: bool = False, console: bool = True) -> dict[str, Any]:
    """Train ``cfg`` (data and storage resolved) on Ray; returns the result dict.

    ``callbacks`` go to the run's ``RunConfig`` (a Tune trial passes ``TuneReportCallback()`` so that every
    report of the workers — per epoch, with ``val_accuracy`` — reaches Tune's scheduler)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from megl_ray.data.pipeline import fits_in_cache, preprocessed_bytes_per_row
    from megl_ray.data.schema import load_dataset_info
    from megl_ray.model.vlm import load_tokenizer, pixel_size
    from megl_ray.training.accounting import planned_steps
    from megl_ray.training.ds_config import global_batch_size
    from megl_ray.training.guards import DIVERGED_KEY, raise_if_diverged
    from megl_ray.training.console import quiet_ray_data, train_logging_config
    from megl_ray.training.inputs import build_datasets, plan_splits
    from megl_ray.training.pictures import local_run_dir, write_pictures
    from megl_ray.training.progress import RunMonitor
    from megl_ray.training.tracking import Tracker
    from megl_ray.training.worker import train_loop_per_worker

    started = time.monotonic()
    run_uri = _run_uri(cfg.run.storage_path, cfg.run.name)
    local_dir = local_run_dir(cfg.run.name)  # pictures and TensorBoard files, beside their copies in run_uri
    info = load_dataset_info(cfg.data.uri)  # fails fast, before Ray starts, on bad data or unreachable storage
    _start_ray(address, verbose)
    quiet_ray_data(verbose)
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    _check_resources(cfg, use_gpu)
    from megl_ray.training.placement import check_run_storage

    check_run_storage(cfg, use_gpu, ray.nodes(), ray.get_runtime_context().get_node_id())

    splits = plan_splits(cfg, info, evaluate_test)
    train_ids = splits.train_ids
    tokenizer = load_tokenizer(cfg.model, splits.corpus + list(info.classes))
    row_bytes = preprocessed_bytes_per_row(pixel_size(cfg.model), info.mask_size, cfg.data.max_rationales,
                                           cfg.model.max_text_tokens)
    cache = cfg.train.cache_data if cfg.train.cache_data is not None else fits_in_cache(len(train_ids), row_bytes)
    datasets, train_cache = build_datasets(cfg, info, tokenizer, splits, cache)
    planned = planned_steps(len(train_ids), cfg.train.num_workers, cfg.data.batch_size, cfg.train.epochs,
                            cfg.train.grad_accum)
    log.info("%d train images, %d workers, global batch %d, %d optimizer steps planned, validation: %s%s",
             len(train_ids), cfg.train.num_workers, global_batch_size(cfg), planned, splits.val_source,
             " (data cached)" if cache else "")

    storage_path, filesystem = _storage(cfg.run.storage_path)
    loop = {
        "config": cfg.to_dict(), "env": _worker_env(use_gpu), "tokenizer": tokenizer,
        "num_classes": info.num_classes, "classes": list(info.classes), "prior": info.prior_array().tolist(),
        "train_rows": len(train_ids), "train_ids": train_ids, "use_gpu": use_gpu, "train_cache": train_cache,
        "has_val": "val" in datasets,
        "run_uri": run_uri, "verbose": verbose,
    }
    tracker = Tracker(cfg, run_uri, local_dir)
    tracker.config(cfg.to_dict())
    monitor = RunMonitor(planned, tracker, display=console)
    loop["board"] = monitor.board
    scaling = ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                            resources_per_worker=None if use_gpu else {"CPU": cfg.train.cpus_per_worker},
                            placement_strategy=cfg.train.placement_strategy)
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop, scaling_config=scaling, datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=list(datasets)),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks),
                             logging_config=train_logging_config(verbose)))
    from megl_ray.training.credentials import credentials_file

    try:
        # the credentials file: for workers that did not inherit them; removed when training ends
        with monitor, credentials_file() as credentials:
            loop["credentials_file"] = credentials
            result = trainer.fit()
    except BaseException:
        tracker.close(success=False)
        raise
    metrics = result.metrics or {}
    if result.error is not None or metrics.get(DIVERGED_KEY):
        tracker.close(success=False)
        if result.error is not None:
            raise UserError(f"training failed: {str(result.error).splitlines()[0]}")
        raise_if_diverged(metrics)
    scheme = "s3://" if cfg.run.storage_path.startswith("s3://") else ""
    test: dict[str, Any] = {"test_accuracy": None, "test_miou": None}
    summary = {
        "checkpoint": scheme + result.checkpoint.path if result.checkpoint else None,
        "run_dir": run_uri, "export": run_uri + "/export", "data_uri": cfg.data.uri,
        "steps": int(metrics.get("step", 0)), "planned_steps": planned, "epochs": int(metrics.get("epoch", 0)),
        "val_accuracy": _round(metrics.get("val_accuracy")), "val_miou": _round(metrics.get("val_miou")),
        "test_accuracy": _round(test["test_accuracy"]), "test_miou": _round(test["test_miou"]),
        **splits.summary(cfg),
        "final_loss": _round(metrics.get("loss")), "num_workers": cfg.train.num_workers,
        "zero_stage": cfg.train.zero_stage, "global_batch_size": global_batch_size(cfg),
    }
    from megl_ray import storage

    def write_result() -> None:
        storage.write_bytes(run_uri + "/result.json", (json.dumps(summary, indent=2) + "\n").encode())

    summary["seconds"] = round(time.monotonic() - started, 1)
    write_result()  # before any post-training evaluation: a failure there loses nothing
    if evaluate_test:
        from megl_ray.training.post_eval import evaluate_where_the_gpus_are

        test = evaluate_where_the_gpus_are(run_uri + "/export", cfg.data.uri, use_gpu, cfg.train.cpus_per_worker,
                                           _worker_env(use_gpu))
        summary.update(test_accuracy=_round(test["test_accuracy"]), test_miou=_round(test["test_miou"]))
        tracker.summary({"test/accuracy": test["test_accuracy"], "test/miou": test["test_miou"]})
    tracker.export(summary["export"])
    if evaluate_test:  # the end-of-run report; a sweep's trials skip it
        summary["pictures"] = write_pictures(monitor.history, run_uri, summary["export"], cfg.data.uri, local_dir,
                                             title=f"run {cfg.run.name}")
    if "tensorboard" in tracker.backends:
        summary["tensorboard"] = str(local_dir / "tensorboard")
    tracker.close(success=True)
    summary["seconds"] = round(time.monotonic() - started, 1)
    write_result()
    return summary


def _round(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return round(float(value), 4)


def next_steps(result: dict[str, Any]) -> list[str]:
    """The commands that evaluate and explain this run's export (they reach the embedded store by themselves)."""
    from megl_ray.training.embedded import megl_home, points_into_embedded

    export, data = result["export"], result["data_uri"]
    home = f"MEGL_HOME={os.environ['MEGL_HOME']} " if "MEGL_HOME" in os.environ and points_into_embedded(
        export, data) else ""
    out = megl_home() / "explanations" / Path(result["run_dir"]).name
    return [f"evaluate it: {home}python -m megl_ray.evaluate --checkpoint {export} --data {data}",
            f"explain it:  {home}python -m megl_ray.explain --checkpoint {export} --gallery --data {data} "
            f"--out {out}"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import dataclasses

    from megl_ray.training.run_identity import check_run, fresh_name, name_given

    args = build_parser().parse_args(argv)
    configure_driver(args.verbose)
    cfg = load_config(args.config or packaged_config("tiny"), args.overrides)
    if not name_given(args.config, args.overrides):  # every invocation a new run, unless a name is chosen
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=fresh_name(cfg.run.name)))
        log.info("run %s (to resume it if interrupted, re-run with run.name=%s)", cfg.run.name, cfg.run.name)
    from megl_ray.training.embedded import embedded_default
    from megl_ray.training.pictures import closing_lines

    with embedded_default(cfg) as resolved:
        complete = check_run(resolved, _run_uri(resolved.run.storage_path, resolved.run.name))
        if complete is not None:
            return complete
        from megl_ray.training.credentials import INHERIT_VAR
        from megl_ray.training.ray_env import local_ray_undone

        # A local Ray leaves token authentication (and our dashboard address) in this process: undone after it,
        # so that a later run in the same process can join a cluster started without tokens.
        with local_ray_undone(("RAY_API_SERVER_ADDRESS", INHERIT_VAR)):
            try:
                result = fit(resolved, args.address, verbose=args.verbose)
            finally:
                import ray

                # Flush the workers' forwarded logs now, so the result is the last line of stdout.
                ray.shutdown()
    for line in closing_lines(result.get("pictures", {}), result["run_dir"], result.get("tensorboard")):
        print(line, file=sys.stderr, flush=True)
    print("\n".join(f"[megl] {line}" for line in next_steps(result)), file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    configure_driver(verbose=False)  # until the flags are parsed
    sys.exit(run_cli("megl_ray.train", main))

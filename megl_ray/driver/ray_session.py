"""The driver's Ray session: join a cluster or start a local Ray on this machine, check that it can hold a run,
and what a run's workers need from the driver (their environment, the run storage as Ray Train wants it)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path

import ray

from megl_ray import storage
from megl_ray.cluster.credentials import INHERIT_VAR, public_env, workers_inherit_env
from megl_ray.cluster.ray_env import worker_pool_env
from megl_ray.config import MEGLConfig, megl_home
from megl_ray.errors import UserError
from megl_ray.reporting.console import configure_driver, filter_forwarded_logs, quiet_env, ray_init_options

log = logging.getLogger("megl_ray.train")


def start_ray(address: str | None, verbose: bool = False) -> None:
    """Join ``address`` (or ``$RAY_ADDRESS``), else start a local Ray with every core of this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    filter_forwarded_logs(verbose)
    os.environ.pop(INHERIT_VAR, None)
    if address:
        ray.init(address=address, **ray_init_options(verbose))
        configure_driver(verbose)
        return
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
    ray.init(
        num_cpus=os.cpu_count() or 2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _temp_dir=temp,
        _node_ip_address="127.0.0.1",
        **ray_init_options(verbose),
    )
    configure_driver(verbose)
    log.info("started a local Ray (%d CPUs), temp dir %s, dashboard port %d", os.cpu_count(), temp, port)


def check_resources(cfg: MEGLConfig, use_gpu: bool, resources: dict[str, float] | None = None) -> None:
    """One line, before any worker starts, when the cluster (``resources``: Ray's by default) cannot hold ``cfg``'s
    workers."""
    resources = ray.cluster_resources() if resources is None else resources
    if use_gpu:
        gpus = resources.get("GPU", 0)
        if cfg.train.num_workers > gpus:
            raise UserError(
                f"train.num_workers={cfg.train.num_workers} needs {cfg.train.num_workers} GPUs, "
                f"the cluster has {gpus:g}: set train.num_workers={int(gpus)} or fewer, "
                "or train.use_gpu=false to train on CPUs"
            )
    else:
        need = cfg.train.num_workers * cfg.train.cpus_per_worker
        cpus = resources.get("CPU", 0)
        if need > cpus - 1.0:  # Ray Data's file-listing task takes a whole CPU: without it the run waits forever
            raise UserError(
                f"train.num_workers={cfg.train.num_workers} needs {need:g} CPUs plus 1 for data, "
                f"the cluster has {cpus:g} (lower train.num_workers or train.cpus_per_worker)"
            )


def run_storage(storage_path: str):
    """(RunConfig storage_path, filesystem): a path without scheme plus a pyarrow filesystem, as Ray Train needs."""
    if storage.is_s3(storage_path):  # Ray Train/Tune keep it in their state: no credentials inside if possible
        fs, path = storage.pyarrow_filesystem(storage_path, embed_credentials=not workers_inherit_env())
        return path, fs
    Path(storage_path).mkdir(parents=True, exist_ok=True)
    return str(Path(storage_path).resolve()), None


def worker_env(use_gpu: bool) -> dict[str, str]:
    """What the workers need in their environment besides what they inherit, credentials left out (see
    ``megl_ray.cluster.credentials``)."""
    env = public_env()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    # DeepSpeed JIT-compiles a kernel on first use (~1 min on 2 cores): keep it between runs.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(megl_home() / "torch_extensions"))
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env

"""A local Ray's token authentication does not outlive it (``megl_ray.cluster.ray_env``)."""

import os
import tempfile
from pathlib import Path

import pytest

from megl_ray.cluster import ray_env


@pytest.mark.slow
def test_a_local_ray_leaves_the_process_out_of_token_mode(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray._raylet import AuthenticationMode, get_authentication_mode

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with ray_env.local_ray_undone():
        ray.init(
            num_cpus=1,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        )
        try:
            # the precondition of the hang: Ray switched this process to tokens for its local instance
            assert os.environ.get("RAY_AUTH_MODE") == "token"
            assert get_authentication_mode() == AuthenticationMode.TOKEN
        finally:
            ray.shutdown()
    assert "RAY_AUTH_MODE" not in os.environ
    assert get_authentication_mode() != AuthenticationMode.TOKEN


def _idle_workers_alive(ray) -> tuple[int, int]:
    """(processes that ran eight overlapping tasks, as Ray Data runs an epoch's; how many of them are still alive
    after 2.5 s idle)."""
    import time

    @ray.remote(num_cpus=0.25)
    def pid():
        time.sleep(1.0)  # overlapping: more than one worker process
        return os.getpid()

    ran = set(ray.get([pid.remote() for _ in range(8)]))
    time.sleep(2.5)  # > the default idle-worker killing threshold (1 s)
    return len(ran), sum(Path(f"/proc/{p}").exists() for p in ran)


@pytest.mark.slow
@pytest.mark.parametrize("keep", [True, False], ids=["worker_pool_env", "ray_defaults"])
def test_task_workers_survive_an_idle_gap_only_with_worker_pool_env(monkeypatch, keep):
    ray = pytest.importorskip("ray")
    for key in ray_env.worker_pool_env({}):
        monkeypatch.delenv(key, raising=False)
    if keep:
        for key, value in ray_env.worker_pool_env({}).items():
            monkeypatch.setenv(key, value)
    with ray_env.local_ray_undone():
        ray.init(
            num_cpus=1,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        )
        try:
            ran, alive = _idle_workers_alive(ray)
        finally:
            ray.shutdown()
    assert ran >= 2
    # Ray's defaults keep one idle worker per CPU (here 1): the next epoch's tasks would start new processes
    assert (alive == ran) if keep else (alive <= 1), (ran, alive)

"""A local Ray's token authentication does not outlive it (``megl_ray.cluster.ray_env``)."""

import os

from megl_ray.cluster import ray_env


def test_restore_puts_variables_back_and_refreshes_ray_only_when_auth_changed(monkeypatch):
    refreshed = []
    monkeypatch.setattr(ray_env, "refresh_auth_cache", lambda: refreshed.append(True))
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("MEGL_TEST_EXTRA", "before")
    with ray_env.local_ray_undone(("MEGL_TEST_EXTRA",)):
        os.environ["MEGL_TEST_EXTRA"] = "during"
    assert os.environ["MEGL_TEST_EXTRA"] == "before" and not refreshed
    with ray_env.local_ray_undone():
        os.environ["RAY_AUTH_MODE"] = "token"  # what ray.init() without an address does
    assert "RAY_AUTH_MODE" not in os.environ and refreshed == [True]


def test_worker_pool_env_keeps_idle_workers_and_lets_the_user_override():
    env = ray_env.worker_pool_env({})
    assert int(env["RAY_num_workers_soft_limit"]) >= 16  # above a run's own ~12 actors on a 2-CPU node
    assert int(env["RAY_idle_worker_killing_time_threshold_ms"]) >= 10_000  # outlives the gap between epochs
    assert ray_env.worker_pool_env({"RAY_num_workers_soft_limit": "4"})["RAY_num_workers_soft_limit"] == "4"

"""A local Ray's token authentication does not outlive it (``megl_ray.training.ray_env``)."""

import os
import tempfile

import pytest

from megl_ray.training import ray_env


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


@pytest.mark.slow
def test_a_local_ray_leaves_the_process_out_of_token_mode(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray._raylet import AuthenticationMode, get_authentication_mode

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with ray_env.local_ray_undone():
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        try:
            # the precondition of the hang: Ray switched this process to tokens for its local instance
            assert os.environ.get("RAY_AUTH_MODE") == "token"
            assert get_authentication_mode() == AuthenticationMode.TOKEN
        finally:
            ray.shutdown()
    assert "RAY_AUTH_MODE" not in os.environ
    assert get_authentication_mode() != AuthenticationMode.TOKEN

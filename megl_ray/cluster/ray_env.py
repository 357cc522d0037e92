"""Undo, after ``ray.shutdown()``, what starting a local Ray instance left in this process.

``ray.init()`` without an address switches the calling process to token authentication: it sets
``RAY_AUTH_MODE=token`` in ``os.environ`` and refreshes Ray's cached C++ config and token (seen with Ray 2.60).
Neither is undone by ``ray.shutdown()``. A later ``ray.init(address=...)`` in the same process -- a second
``train.main`` in one interpreter, or a test after another test's local Ray -- then runs its driver in token mode
against a cluster started without it (``LocalCluster`` runs ``RAY_AUTH_MODE=disabled``). The driver's own gRPC
server then refuses every call from the cluster's workers ("Missing authorization header in request!" in its
core-worker log), so the results of the tasks it owns never arrive: the first Ray Data execution (the cached split's
``materialize``) waits forever, or fails with ``OwnerDiedError`` when a task needs an argument the driver owns.

    with local_ray_undone(("RAY_API_SERVER_ADDRESS",)):
        ray.init(); ...; ray.shutdown()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import ray
from ray._raylet import AuthenticationTokenLoader, Config

AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@contextlib.contextmanager
def local_ray_undone(extra: Sequence[str] = ()) -> Iterator[None]:
    """Restore the authentication variables (and ``extra`` ones) on exit; leave Ray shut down inside it."""
    saved = {key: os.environ.get(key) for key in (*AUTH_ENV, *extra)}
    try:
        yield
    finally:
        restore(saved)


def restore(saved: dict[str, str | None]) -> None:
    """Put ``saved`` variables back (``None``: unset); refresh Ray's cached auth state if its variables changed."""
    changed = any(os.environ.get(key) != saved[key] for key in AUTH_ENV if key in saved)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if changed:
        refresh_auth_cache()


def refresh_auth_cache() -> None:
    """Make Ray's C++ side read the authentication variables again (popping ``RAY_AUTH_MODE`` alone is not enough:
    the driver keeps refusing unauthenticated calls). Ray has no public call for it; this is what Ray's own tests do
    between clusters (``ray._private.authentication_test_utils.reset_auth_token_state``): config, then token cache."""
    if ray.is_initialized():  # a connected core worker keeps the mode it started with; never change it under it
        return

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def worker_pool_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Raylet settings for the Ray instances this project starts itself (the local Ray of ``train``/``tune``,
    ``LocalCluster``'s nodes): keep idle task workers alive between a training run's epochs. Values the user set in
    ``environ`` (default ``os.environ``) win.

    Why: by default a raylet keeps at most as many worker processes as it has CPUs (``num_workers_soft_limit``)
    and kills any idle one above that after 1 s (``idle_worker_killing_time_threshold_ms``). A training run's own
    actors (Ray Train's controller and workers, Ray Data's coordinators, ~12 processes) already exceed 2 CPUs, so
    every Ray Data task of every epoch (each worker's share, each validation read) started a new Python process
    that imported pyarrow, numpy and torch again: 94 worker processes for the default run, 34 s per epoch of
    22 steps that take 3 s. With these: 22 processes, 7 s per epoch, the default run 9 min 22 s -> 3 min 25 s
    (same metrics). Idle workers keep their memory (a few hundred MB each, ~10 of them in that run)."""
    environ = os.environ if environ is None else environ
    wanted = {"RAY_num_workers_soft_limit": "32", "RAY_idle_worker_killing_time_threshold_ms": "60000"}
    return {key: environ.get(key, value) for key, value in wanted.items()}

"""Undo, after ``ray.shutdown()``, what starting a local Ray instance left in this process.

``ray.init()`` without an address switches the calling process to token authentication: it sets
``RAY_AUTH_MODE=token`` in ``os.environ`` and refreshes Ray's cached C++ config and token (seen with Ray 2.60). Neither is
undone by ``ray.shutdown()``. A later ``ray.init(address=...)`` in the same process -- a second ``train.main`` in one
interpreter, or a test after another test's local Ray -- then runs its driver in token mode against a cluster
started without it (``LocalCluster`` runs ``RAY_AUTH_MODE=disabled``). The driver's own gRPC server then refuses
every call from the cluster's workers ("Missing authorization header in request!" in its core-worker log), so the
results of the tasks it owns never arrive: the first Ray Data execution (the cached split's ``materialize``) waits
forever, or fails with ``OwnerDiedError`` when a task needs an argument the driver owns.

    with local_ray_undone(("RAY_API_SERVER_ADDRESS",)):
        ray.init(); ...; ray.shutdown()
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

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
    import ray

    if ray.is_initialized():  # a connected core worker keeps the mode it started with; never change it under it
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()

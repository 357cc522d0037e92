"""Fixtures of the integration tier: Ray (local instances and a real two-node cluster on 127.0.0.1), the embedded
SeaweedFS S3 server, and the raylet settings every Ray instance of the suite gets."""

import os
import tempfile
from pathlib import Path

import pytest
import ray

from megl_ray.cluster.local_cluster import LocalCluster
from megl_ray.cluster.ray_env import AUTH_ENV, local_ray_undone, refresh_auth_cache, restore, worker_pool_env
from megl_ray.storage import EmbeddedS3

REPO = Path(__file__).resolve().parents[2]

# The tests' own ``ray.init(num_cpus=2)`` instances get the raylet settings of the project's (they inherit this
# environment): task workers survive between epochs instead of a new process per Ray Data task.
for _key, _value in worker_pool_env().items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module", autouse=True)
def _local_ray_undone(request):
    """A module's in-process ``ray.init()`` (a local instance) switches the whole process to Ray's token
    authentication, and ``ray.shutdown()`` does not switch it back: a later module's driver joining the two-node
    cluster (started without tokens) would refuse its workers' calls and wait forever for its first Ray Data
    execution (``megl_ray.cluster.ray_env``). Undone at the end of every module, after its own Ray fixtures — but not
    for the modules of the shared Ray: the next one still talks to it with tokens (the same hang), and its shutdown
    puts the variables back itself (``pytest_runtest_teardown``)."""
    if request.node.get_closest_marker("shared_ray") is not None:
        yield
        return
    with local_ray_undone(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")):
        yield


# The environment a shared Ray instance changed (token authentication, RAY_ADDRESS): put back when it is shut down.
_SHARED_RAY_SAVED: dict[str, str | None] = {}


@pytest.fixture(scope="session")
def shared_ray(embedded_s3):
    """One local Ray instance (2 CPUs; its workers see the embedded S3 server's variables) for every test of a module
    marked ``shared_ray`` — tests that need *a* Ray in this process, not a Ray of their own. Started by the first of
    them and shut down after the last (``pytest_runtest_teardown``, not the end of the session: later modules start
    Ray instances or join clusters of their own); those modules run first in the tier
    (``pytest_collection_modifyitems``). Why: each ``ray.init`` + shutdown costs ~5 s here, and every fresh instance's
    workers import torch and the project again."""
    _SHARED_RAY_SAVED.update({key: os.environ.get(key) for key in (*AUTH_ENV, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")})
    # A short temp dir: Ray's unix sockets live under it and their paths are limited to ~107 bytes.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        runtime_env={"env_vars": embedded_s3.env()},
    )
    return ray


def _uses_shared_ray(item) -> bool:
    return item is not None and item.get_closest_marker("shared_ray") is not None


def pytest_collection_modifyitems(config, items):
    """The integration modules marked ``shared_ray`` first (whole modules: the sort is stable and the marker is a
    module's), so that one Ray instance serves them all in a row."""
    tier = str(Path(__file__).parent)
    items.sort(key=lambda item: 0 if not str(item.path).startswith(tier) else 1 if _uses_shared_ray(item) else 2)


def pytest_runtest_teardown(item, nextitem):
    """Shut the shared Ray down after the last test that uses it; refresh Ray's cached authentication mode (the
    modules' own ``_local_ray_undone`` could not while it was connected)."""
    if _uses_shared_ray(item) and not _uses_shared_ray(nextitem) and ray.is_initialized():
        ray.shutdown()
        restore(_SHARED_RAY_SAVED)
        refresh_auth_cache()


@pytest.fixture(scope="session")
def embedded_s3(tmp_path_factory):
    """One embedded SeaweedFS S3 server for the whole session; tests pass ``embedded_s3.options`` explicitly
    (nothing is put in os.environ). Use a bucket of your own."""
    server = EmbeddedS3(tmp_path_factory.mktemp("embedded_s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def two_node_cluster(embedded_s3, tmp_path_factory):
    """A real two-node Ray cluster on 127.0.0.1 (``megl_ray.cluster.local_cluster``): a head with 2 CPUs and the
    custom resource ``node_a``, a worker node with 1 CPU and ``node_b``, small object stores, their own ports and
    temp dirs; every node reaches the embedded S3 server. Tests may kill and add nodes (``cluster.kill``/``add_node``);
    every process group started is killed at the end (other Ray instances on the machine are left alone)."""
    env = {
        **embedded_s3.env(),
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "megl_ray" / "torch_extensions")
        ),
    }
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), env=env)
    try:
        cluster.add_node(num_cpus=2, resources={"node_a": 1})
        cluster.add_node(num_cpus=1, resources={"node_b": 1})
        yield cluster
    finally:
        cluster.shutdown()

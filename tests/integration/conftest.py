"""Fixtures of the integration tier: Ray (local instances and a real two-node cluster on 127.0.0.1), the embedded
SeaweedFS S3 server, and the raylet settings every Ray instance of the suite gets."""

import os
from pathlib import Path

import pytest

from megl_ray.cluster.local_cluster import LocalCluster
from megl_ray.cluster.ray_env import local_ray_undone, worker_pool_env
from megl_ray.storage import EmbeddedS3

REPO = Path(__file__).resolve().parents[2]

# The tests' own ``ray.init(num_cpus=2)`` instances get the raylet settings of the project's (they inherit this
# environment): task workers survive between epochs instead of a new process per Ray Data task.
for _key, _value in worker_pool_env().items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module", autouse=True)
def _local_ray_undone():
    """A module's in-process ``ray.init()`` (a local instance) switches the whole process to Ray's token
    authentication, and ``ray.shutdown()`` does not switch it back: a later module's driver joining the two-node
    cluster (started without tokens) would refuse its workers' calls and wait forever for its first Ray Data
    execution (``megl_ray.cluster.ray_env``). Undone at the end of every module, after its own Ray fixtures."""
    with local_ray_undone(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")):
        yield


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

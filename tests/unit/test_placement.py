"""``megl_ray.cluster.placement``: which nodes can host a worker, and the node-local storage check (no Ray)."""

import pytest

from megl_ray.cluster.placement import check_run_storage, nodes_that_fit
from megl_ray.config import load_config, packaged_config
from megl_ray.errors import ConfigError, UserError

NODES = [
    {"NodeID": "head", "Alive": True, "Resources": {"CPU": 2.0, "node_a": 1.0}},
    {"NodeID": "b", "Alive": True, "Resources": {"CPU": 1.0, "node_b": 1.0}},
    {"NodeID": "dead", "Alive": False, "Resources": {"CPU": 8.0}},
    {"NodeID": "gpu", "Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
]


def _cfg(*overrides):
    return load_config(packaged_config("tiny"), list(overrides))


def test_the_placement_strategy_is_ray_trains_own_option():
    assert _cfg().train.placement_strategy == "PACK"
    assert _cfg("train.placement_strategy=SPREAD").train.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="train.placement_strategy"):
        _cfg("train.placement_strategy=EVERYWHERE")


def test_nodes_that_fit_a_worker():
    assert nodes_that_fit(NODES, {"CPU": 0.5}) == ["head", "b", "gpu"]
    assert nodes_that_fit(NODES, {"CPU": 1.5}) == ["head", "gpu"]
    assert nodes_that_fit(NODES, {"GPU": 1.0}) == ["gpu"]


def test_a_node_local_storage_path_is_refused_when_workers_can_land_elsewhere(tmp_path):
    local = _cfg(f"run.storage_path={tmp_path}")
    with pytest.raises(UserError, match="is a node-local path, but workers can be placed on 3 nodes of this cluster"):
        check_run_storage(local, False, NODES, "head")
    check_run_storage(local, False, NODES[:1], "head")  # one node: the driver's
    check_run_storage(local, False, [NODES[0], {**NODES[3], "Resources": {"CPU": 0.2}}], "head")  # b cannot host
    with pytest.raises(UserError, match="placed on 1 node of"):  # the only GPU node is not the driver's
        check_run_storage(local, True, NODES, "head")
    check_run_storage(_cfg("run.storage_path=s3://bucket/runs"), False, NODES, "head")
    check_run_storage(_cfg(f"run.storage_path={tmp_path}", "run.shared_filesystem=true"), False, NODES, "head")

"""Where the workers of a run can land, and what that asks of the run's storage.

Ray Train workers write their checkpoint shards to ``run.storage_path`` themselves. A local path is local to each
node: with workers on several nodes, each node's disk would hold part of a checkpoint and no node could resume from
it. So a local path is refused unless the driver's node is the only one a worker can be placed on (or the path is a
shared filesystem, ``run.shared_filesystem``).
"""

from __future__ import annotations

from typing import Any

from megl_ray import storage
from megl_ray.config import MEGLConfig
from megl_ray.errors import UserError


def worker_resources(cfg: MEGLConfig, use_gpu: bool) -> dict[str, float]:
    """What one training worker reserves (the ``resources_per_worker`` of the scaling config, GPU included)."""
    return {"GPU": 1.0} if use_gpu else {"CPU": cfg.train.cpus_per_worker}


def nodes_that_fit(nodes: list[dict[str, Any]], need: dict[str, float]) -> list[str]:
    """Ids of the alive nodes (``ray.nodes()`` entries) whose total resources can hold one worker."""
    return [
        n["NodeID"]
        for n in nodes
        if n.get("Alive") and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items())
    ]


def check_run_storage(cfg: MEGLConfig, use_gpu: bool, nodes: list[dict[str, Any]], driver_node: str) -> None:
    """Refuse a node-local ``run.storage_path`` when workers may be placed on a node other than the driver's."""
    if storage.is_s3(cfg.run.storage_path) or cfg.run.shared_filesystem:
        return
    hosts = nodes_that_fit(nodes, worker_resources(cfg, use_gpu))
    if set(hosts) <= {driver_node}:
        return
    plural = "s" if len(hosts) != 1 else ""
    raise UserError(
        f"run.storage_path={cfg.run.storage_path} is a node-local path, but workers can be placed on "
        f"{len(hosts)} node{plural} of this cluster (not only the driver's): checkpoints written there "
        f"could not be resumed from another node; use shared storage (run.storage_path=s3://...) or, for "
        f"a filesystem mounted on every node, run.shared_filesystem=true"
    )

"""Collectives of the training loop, every tensor on the engine's device.

Ray Train's process group is NCCL on GPUs, which only moves CUDA tensors: a CPU tensor handed to it (a torchmetrics
state, the ids trained so far, a sum) fails there while passing under gloo on a laptop. So every collective here
takes the device explicitly and moves what it sends onto it; results come back where the caller keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_ids(ids: list[str], device: torch.device) -> list[str]:
    """Every rank's ``ids`` concatenated in rank order (a tensor collective: ``all_gather_object`` picks its own
    device from the backend, not the engine's)."""
    if not _distributed():
        return list(ids)
    payload = torch.tensor(list(json.dumps(list(ids)).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    out: list[str] = []
    for part, n in zip(parts, sizes):
        out.extend(json.loads(bytes(part[: int(n.item())].cpu().tolist()).decode()))
    return out


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key sums over the ranks."""
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.cpu().tolist()))


def device_sync_fn(device: torch.device):
    """A torchmetrics ``dist_sync_fn`` that gathers a state through ``device`` and hands the gathered copies back on
    the state's own device (where the metric computes)."""

    def sync(tensor: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
        gathered = gather_all_tensors(tensor.to(device), group=group)
        return [g.to(tensor.device) for g in gathered]

    return sync


def route_metric_sync(metric_objects: Iterable[Any], device: torch.device) -> None:
    """Make every torchmetrics ``Metric`` inside ``metric_objects`` (our metric wrappers, collections, metrics)
    synchronise through ``device``."""
    sync = device_sync_fn(device)
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Metric):
            obj.dist_sync_fn = sync
        if isinstance(obj, torch.nn.Module):
            for child in obj.children():
                visit(child)
        elif hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                if isinstance(value, (Metric, torch.nn.Module)) or type(value).__module__.startswith("megl_ray"):
                    visit(value)

    for obj in metric_objects:
        visit(obj)

"""What exists in memory during a DeepSpeed training step, by role (``bench/memory_model.py`` uses it): storages
of tensors, the ZeRO optimizer's parts, autocast's weight copies, and the tensors autograd saves for the backward."""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def key(t: torch.Tensor) -> tuple[int, int] | None:
    st = t.untyped_storage()
    return (st.data_ptr(), st.nbytes()) if st.nbytes() else None


def storages(tensors, exclude: set = frozenset()) -> set[tuple[int, int]]:
    return {k for t in tensors if isinstance(t, torch.Tensor) and (k := key(t)) and k not in exclude}


def nbytes(keys) -> int:
    return sum(n for _, n in keys)


def _tensors_in(value, depth: int = 0):
    """Tensors held by an optimizer attribute: a tensor, a container of them, or a bucket's ``buffer``."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth + 1)
    elif hasattr(value, "buffer") and depth < 3:
        yield from _tensors_in(value.buffer, depth + 1)


MASTERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def optimizer_parts(opt, params: set) -> dict[str, set]:
    """What the ZeRO optimizer holds, by role: masters (+ AdamW state), gradients, reduction buckets."""
    parts: dict[str, set] = {"optimizer": set(), "grads": set(), "buckets": set()}
    for name, value in vars(opt).items():
        if name in MASTERS:
            parts["optimizer"] |= storages(value, params)
            parts["grads"] |= storages((m.grad for m in value), params)
        elif "ipg" in name:
            parts["buckets"] |= storages(_tensors_in(value), params)
        elif "grad" in name:
            parts["grads"] |= storages(_tensors_in(value), params)
    for state in opt.optimizer.state.values():
        parts["optimizer"] |= storages(state.values(), params)
    parts["grads"] -= parts["optimizer"]
    return parts


class CastWatch(TorchDispatchMode):
    """The 16-bit copies autocast makes of trainable fp32 weights, and which of them are still alive when the
    forward's last module runs (autocast caches them until the forward ends; the backward may save them)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.copies: dict[int, tuple[StorageWeakRef, int]] = {}
        self.alive_at_end = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        if (
            func is torch.ops.aten._to_copy.default
            and isinstance(src, torch.Tensor)
            and src.dtype == torch.float32
            and out.dtype in (torch.bfloat16, torch.float16)
            and any(src.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in self.trainable)
        ):
            st = out.untyped_storage()
            self.copies[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        return out

    def holds(self, data_ptr: int) -> bool:
        """A live weight copy is at this address (a freed one's address may come back as an activation)."""
        return data_ptr in self.copies and not self.copies[data_ptr][0].expired()

    def end_of_forward(self, *_):
        self.alive_at_end = sum(n for ref, n in self.copies.values() if not ref.expired())


class SavedTracker:
    """Live bytes of tensors autograd saves for the backward (unique storages), released when autograd drops them:
    activations, and gathered ZeRO-3 parameters that a saved view (``weight.t()``) keeps alive after DeepSpeed
    released the parameter. Storages of the parameters themselves (and their partitions) are not counted."""

    def __init__(self, params: set, gathered: set, watch: CastWatch):
        self.params, self.gathered, self.watch = params, gathered, watch
        self.refs: dict[tuple[int, int], list] = {}  # storage → [saved references, kind]
        self.live = {"activations": 0, "gathered": 0}
        self.peak = dict(self.live)
        self.per_layer: dict[int, int] = {}
        self.layer: int | None = None
        self.seen: set = set()

    def pack(self, t: torch.Tensor):
        k = key(t)
        if isinstance(t, torch.nn.Parameter) or k is None or k in self.params or self.watch.holds(k[0]):
            return t  # parameters are counted as such, autocast's weight copies by CastWatch
        self.seen.add(k)
        if k not in self.refs:
            kind = "gathered" if k in self.gathered else "activations"
            self.refs[k] = [0, kind]
            self.live[kind] += k[1]
            self.peak[kind] = max(self.peak[kind], self.live[kind])
            if self.layer is not None and kind == "activations":
                self.per_layer[self.layer] = self.per_layer.get(self.layer, 0) + k[1]
        self.refs[k][0] += 1
        return _Held(t, k, self)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, k):
        self.refs[k][0] -= 1
        if not self.refs[k][0]:
            self.live[self.refs.pop(k)[1]] -= k[1]


class _Held:
    def __init__(self, t, k, tracker):
        self.t, self.k, self.tracker = t, k, tracker

    def __del__(self):
        self.tracker.release(self.k)

"""What a logging step reports: every micro-batch of every rank since the previous log, not rank 0's last one.

HF Trainer logs the loss averaged over its logging window; a micro-batch of 4 images on one rank is noise, and
counting one micro-batch per optimizer step undercounts throughput by ``train.grad_accum``. Each micro-batch adds its
terms to a device-side tensor (no host sync); at a logging step every rank takes part in one all-reduce of it (the
logging steps are the same on every rank: ``Progress.is_log_step``), and one more of the memory peaks (max and min).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

TERMS = ("loss", "ce", "text", "visual", "dc", "rrr", "cf", "bg")
"""Every term ``MEGLModel.forward`` may report; a term absent from a micro-batch (no mask in it, say) is averaged
over the micro-batches that had it."""
MASKED_TERMS = ("visual", "dc", "rrr", "cf", "bg")
"""Means over some samples of a micro-batch (with a mask, without one, trusted): NaN where it has none, i.e.
absent."""


@dataclass
class WindowStats:
    terms: dict[str, float]
    """Each term's mean over the window's micro-batches of all ranks."""
    micro_batches: int
    samples: int
    """Real samples (padding copies excluded) of every rank."""
    tokens: int
    elapsed_s: float
    data_wait_s: float
    """Rank 0's time waiting for its next batch (the rest of ``elapsed_s`` is compute and communication)."""
    mem_mib: tuple[float, float] = field(default=(0.0, 0.0))
    """(max, min) over the ranks of each rank's peak memory (allocated on a GPU, resident on a CPU)."""
    reserved_mib: float = 0.0
    """The largest peak of reserved memory (the CUDA caching allocator's; resident memory on a CPU) of any rank."""


PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}
"""Dense bf16 (fp16 before Ampere) tensor-core TFLOP/s by GPU name, from the datasheets (no sparsity): the peak an
MFU is a fraction of. Matched in this order against ``torch.cuda.get_device_name()``."""


def device_peak_tflops(name: str) -> float | None:
    """The datasheet peak of the GPU named ``name``, or None when it is not in the table (set ``run.peak_tflops``)."""
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops
    return None


def peak_memory_mib() -> tuple[float, float]:
    """This process's peaks: (allocated, reserved) CUDA memory on a GPU; resident memory (twice) otherwise."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, torch.cuda.max_memory_reserved() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return rss, rss


class LogWindow:
    def __init__(self, device: torch.device):
        self.device = device
        self.sums = torch.zeros(2 * len(TERMS), dtype=torch.float64, device=device)  # per term: sum, count
        self.counts = [0, 0, 0]  # micro-batches, samples, tokens: host numbers, sent with the sums at a log
        self.started = time.monotonic()
        self.data_wait_s = 0.0

    def add(self, terms: dict[str, torch.Tensor], samples: int, tokens: int) -> None:
        """One micro-batch: its detached terms (device tensors), its real samples and tokens (host numbers)."""
        for i, name in enumerate(TERMS):
            if name not in terms:
                continue
            value = terms[name].detach().double()
            if name in MASKED_TERMS:  # NaN: no sample of this micro-batch has the term; counted on the device
                present = ~torch.isnan(value)
                self.sums[i] += torch.where(present, value, torch.zeros_like(value))
                self.sums[len(TERMS) + i] += present.double()
            else:  # a NaN loss stays NaN in the log: it is news
                self.sums[i] += value
                self.sums[len(TERMS) + i] += 1
        self.counts = [self.counts[0] + 1, self.counts[1] + samples, self.counts[2] + tokens]

    def waited(self, seconds: float) -> None:
        self.data_wait_s += seconds

    def reduce(self, peak_mem_mib: tuple[float, float], reset: bool = True) -> WindowStats:
        """Collective (every rank, at the same step): the window over all ranks; with ``reset`` a new one starts.
        ``peak_mem_mib``: this rank's (allocated, reserved) peaks."""
        sums = torch.cat([self.sums, torch.tensor(self.counts, dtype=torch.float64, device=self.device)])
        allocated, reserved = peak_mem_mib
        mem = torch.tensor([allocated, -allocated, reserved], dtype=torch.float64, device=self.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(mem, op=dist.ReduceOp.MAX)
        values = sums.cpu().tolist()
        n = len(TERMS)
        terms = {name: values[i] / values[n + i] for i, name in enumerate(TERMS) if values[n + i] > 0}
        stats = WindowStats(
            terms=terms,
            micro_batches=int(values[-3]),
            samples=int(values[-2]),
            tokens=int(values[-1]),
            elapsed_s=time.monotonic() - self.started,
            data_wait_s=self.data_wait_s,
            mem_mib=(float(mem[0]), -float(mem[1])),
            reserved_mib=float(mem[2]),
        )
        if reset:
            self.sums.zero_()
            self.counts = [0, 0, 0]
            self.started = time.monotonic()
            self.data_wait_s = 0.0
        return stats

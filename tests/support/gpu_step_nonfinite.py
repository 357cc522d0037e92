"""Run by tests/integration/test_gpu_step_bench.py in a subprocess: ``bench/gpu_step.py``'s plain loop and its
DeepSpeed loop on a toy model whose loss is NaN at the second of three steps. Prints one JSON object: each side's
skipped-step count and whether its weights stayed finite (a NaN step applied would make them NaN)."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_step  # noqa: E402

from megl_ray.config import load_config  # noqa: E402


class NaNAtSecondCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.calls = 0

    def forward(self, x, **_):
        self.calls += 1
        loss = self.lin(x).pow(2).mean()
        return SimpleNamespace(loss=loss * float("nan") if self.calls == 2 else loss)


cfg = load_config("tiny", ["train.num_workers=1", "train.grad_accum=1", "train.precision=bf16"])
batch = {"x": torch.randn(8, 4)}
gpu_step.init_single_rank("cpu")
result = {}
for side, loop in (("plain", gpu_step.plain_loop), ("ds", gpu_step.deepspeed_loop)):
    torch.manual_seed(0)
    model = NaNAtSecondCall()
    out = loop(model, cfg, batch, "cpu", 0, 3)
    result[side] = {"skipped": out["skipped"], "finite": all(bool(p.isfinite().all()) for p in model.parameters())}
print(json.dumps(result))

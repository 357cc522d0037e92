"""The fp32 islands of mixed precision (norms, saliency, losses) compute in fp32 under autocast; the distributed
side (bf16 under ZeRO-2/3 against fp32) is in ``tests/integration/test_distributed_numerics.py``."""

import math

import torch

from megl_ray.config import load_config, packaged_config
from megl_ray.model import build_megl_model, losses
from megl_ray.model.precision import is_norm
from tests.support.toy import corpus, make_batch


def test_fp32_islands_compute_in_fp32_under_autocast(monkeypatch):
    torch.manual_seed(0)
    cfg = load_config(packaged_config("tiny"), ["train.precision=bf16", "model.freeze_vision=true"])
    model = build_megl_model(cfg, 4, corpus=corpus()).train()
    tower = model.vlm.model.vision_tower
    frozen = {p.dtype for p in tower.parameters() if p.dim() >= 2}
    assert frozen == {torch.bfloat16}  # frozen matmul/conv weights stored in 16 bits
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 master weights
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    seen = []
    for name in ("group_norm", "layer_norm"):  # record the dtype the norm kernels really compute in
        real = getattr(torch.nn.functional, name)
        monkeypatch.setattr(
            torch.nn.functional, name, lambda x, *a, _real=real, **k: seen.append(x.dtype) or _real(x, *a, **k)
        )
    batch = make_batch(model, cfg, n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        x = torch.rand(4, 8, 8, dtype=torch.bfloat16) + 1e-3
        cam = losses.distribution_consistency_loss(x, torch.ones(8, 8))
    assert seen and set(seen) == {torch.float32}  # every norm computed in fp32
    assert out.loss.dtype == torch.float32 and cam.dtype == torch.float32 and out.saliency.dtype == torch.float32
    assert all(math.isfinite(float(v)) for v in out.terms.values())
    out.loss.backward()
    assert model.classifier.head.weight.grad.dtype == torch.float32

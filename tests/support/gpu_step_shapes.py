"""Run by tests/integration/test_gpu_step_bench.py in a subprocess: every case of ``bench/gpu_step.py`` built at
its real shapes on the meta device (no memory, no GPU), as the GPU run builds it on CUDA. Prints one JSON object per
case: the batch's shape, the built model's parameter counts and dtypes, and the memory model's prediction."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import gpu_step  # noqa: E402
import gpu_step_models as models  # noqa: E402

out = {}
for case in gpu_step.CASES:
    cfg = gpu_step.case_config(case, tiny=False, batch=None, rationale_tokens=None)
    model, batch = models.build(case.lm, cfg, tiny=False, device="meta")
    trainable, frozen = models.param_counts(model)
    out[gpu_step.case_name(case, cfg)] = {
        "input_ids": list(batch["input_ids"].shape),
        "pixels": list(batch["pixels"].shape),
        "trainable": trainable,
        "frozen": frozen,
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "frozen_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
        "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "checkpointing": cfg.model.gradient_checkpointing,
        "predicted": models.predicted_memory(model, cfg, batch, use_gpu=True),
    }
print(json.dumps(out))

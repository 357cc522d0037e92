"""A standalone export (``python -m megl_ray.export --merge SRC DST``): LoRA merged into the base weights by peft,
every tensor written, loadable without the base checkpoints, and ``vlm/``, the LLaVA for transformers alone.

The model is built in the dtype it is written in (bf16 by default: the base's own) and written tensor by tensor
(``model.safetensors_stream``; ``vlm/`` in shards of an eighth of the model), so host RAM peaks near one model of that
dtype: 1.38× its bf16 size at mid size (tests/integration/test_export_memory.py), where an fp32 build whose tensors
were cloned for saving needed 4.7× — for LLaVA-1.5-7B, ~19 GB instead of ~64 GB.
"""

from __future__ import annotations

from typing import Any

import torch

from megl_ray.config import config_from_dict
from megl_ray.model.export_io import VLM_DIR, load_export, save_export


def merge_export(src: str, dst: str, vlm_dtype: str = "bfloat16", base_path: tuple[str, ...] = ()) -> dict[str, Any]:
    """A standalone export from ``src`` (its bases re-pointed by ``base_path``): LoRA merged, every tensor
    written, loadable without base checkpoints; and ``vlm/``, the LLaVA for transformers alone, in ``vlm_dtype``
    (``bfloat16`` by default: the base's own precision, half an fp32 export; ``float16``, or ``float32`` on
    request). The model is built in ``vlm_dtype`` and written without copies: host RAM peaks near one model of that
    dtype (see the module docstring)."""
    dtype = getattr(torch, vlm_dtype)
    # Loaded in the dtype it is written in: a 7B merge holds one model in host RAM, not an fp32 one and its copies
    exported = load_export(src, merge_lora=True, base_path=base_path, dtype=dtype)
    model, cfg = exported.model, exported.config
    merged_cfg = config_from_dict(cfg.to_dict(), ["model.lora_r=0"])
    model.cfg = merged_cfg.model
    save_export(
        model,
        merged_cfg,
        exported.classes,
        dst,
        standalone=True,
        vlm_dtype=dtype,
        extra={
            k: v
            for k, v in exported.meta.items()
            if k not in ("format_version", "classes", "num_classes", "omitted", "standalone")
        },
    )
    return {
        "export": dst,
        "source": src,
        "merged_lora_layers": exported.lora_merged,
        "tensors": len(model.state_dict()),
        "standalone": True,
        "vlm": dst.rstrip("/") + "/" + VLM_DIR,
        "vlm_dtype": vlm_dtype,
    }

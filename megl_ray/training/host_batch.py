"""A training micro-batch, readied on the host before it goes to the device, so that the step reads nothing back.

On a GPU every read of a device value (``bool()``, ``.item()``, a boolean selection, ``nonzero``) makes the host wait
for the kernels queued before it; a few per micro-step leave the GPU idle while the next launches are prepared. What
can be decided from the batch itself is decided here, while it is still host memory:

- the rationale positions of the text loss (rows and columns of ``losses.rationale_positions``): the LM head then
  selects them by index, not by a boolean mask the device would have to count;
- the attention mask is dropped when every sequence is right-padded, as the training sequences are: a causal LM's
  real tokens never attend to the padding after them, so the outputs at every real position are the same without
  it, and transformers' SDPA path then takes its ``is_causal`` shortcut (flash kernels allowed) without reading the
  mask back to check whether it may (``masking_utils._ignore_causal_mask_sdpa``: two reads per LM forward);
- each tensor goes to a GPU from pinned memory without blocking the host.
"""

from __future__ import annotations

import torch

from megl_ray.model.losses import rationale_indices


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row is ones then zeros (host tensor)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def ready_on_host(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` (host tensors) with the rationale positions added and a right-padding attention mask dropped."""
    batch = dict(batch)
    if "text_labels" in batch:
        batch["text_rows"], batch["text_cols"] = rationale_indices(batch["text_labels"])
    if "attention_mask" in batch and right_padded(batch["attention_mask"]):
        del batch["attention_mask"]
    return batch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch tensor on ``device``: to a GPU from pinned memory and without waiting (the copy overlaps the
    work already queued; the kernels that read it are ordered after it on the same stream)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

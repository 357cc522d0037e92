"""Counterfactual backgrounds for the option ``loss.counterfactual_weight`` (see ``LossConfig``).

Each image's *explained region* (its ground-truth map where it has one, else its own saliency Â) is kept and the
rest replaced by the background of another image of the batch, whose own explained region is blanked with its
background's mean colour. A shortcut that lives outside the explanation — a decoy whose position encodes the
label — then comes from a different image and points to a different class, so a classifier that still predicts
the original label from I_cf must be reading the explained region. The regions are detached: this term shapes
what the prediction uses, the visual terms shape Â. After Chang et al., CVPR 2021 (counterfactual and invariant
data generation from saliency) and Xiao et al., ICLR 2021 (background swaps, "Mixed-Rand").

The donor is the next image of the same micro-batch (``roll``): no extra data, and nothing crosses workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megl_ray.model.saliency import upsample

KEEP_THRESHOLD = 0.5
MASK_DILATION = 5  # px: ground-truth masks are the strokes alone; keep their anti-aliased rim with them


def explained_region(
    saliency: torch.Tensor, masks: torch.Tensor | None, has_mask: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """(B, 1, H, W) float {0, 1}: the dilated ground-truth region for samples with a mask, Â ≥ 0.5 otherwise."""
    region = (upsample(saliency.detach().float(), size) >= KEEP_THRESHOLD).float()
    if masks is not None:  # selected per sample below: no host read of whether any sample has a mask
        gt = F.interpolate(masks.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        gt = F.max_pool2d((gt >= KEEP_THRESHOLD).float(), MASK_DILATION, stride=1, padding=MASK_DILATION // 2)
        region = torch.where(has_mask.view(-1, 1, 1, 1), gt, region)
    return region


def counterfactual_images(pixels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """I_cf = R ⊙ I + (1 − R) ⊙ background of the next image (its own region R' filled with the mean colour of the
    rest of it). ``pixels`` (B, 3, H, W), ``region`` (B, 1, H, W) in {0, 1}; a batch of one is returned as is."""
    if pixels.shape[0] < 2:
        return pixels
    donor, donor_region = pixels.roll(1, dims=0), region.roll(1, dims=0)
    outside = 1 - donor_region
    fill = (donor * outside).sum(dim=(2, 3), keepdim=True) / outside.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    background = donor * outside + fill * donor_region
    return region * pixels + (1 - region) * background

"""Counterfactual images for the options ``loss.counterfactual_weight`` and ``loss.background_weight``.

Each trusted image's *explained region* R (its ground-truth map; for images without one the support of the
evidence prior Ā, or nothing, or Â ≥ 0.5: ``loss.counterfactual_regions``) gives two images:

- I_cf = R ⊙ I + (1 − R) ⊙ the background of another trusted image (its own region blanked with its background's
  mean colour): a shortcut outside the explanation now comes from another image and points to another class, so
  predicting the original label from I_cf means reading R (``counterfactual_images``);
- I_bg = (1 − R) ⊙ I + R ⊙ the mean colour of I's background: the shortcut stays, the object is gone, and the
  prediction should carry no class, i.e. be uniform (``background_images``, ``losses.uniform_kl``).

Why not the model's own Â: on the 90 % of samples without a map, Â early in training sits on whatever CE found
first — the shortcut — and pasting "the explained region" onto other backgrounds then rewards the shortcut
(measured in bench/results/shortcut/). The prior's support is data, not the model's belief: a shortcut where no
annotator ever marked evidence is swapped out of every image (one inside the evidence needs the annotated maps).
The regions are detached: these terms shape what the prediction uses, the visual terms shape Â. After Chang et
al., CVPR 2021 (counterfactual and invariant data generation from saliency), Xiao et al., ICLR 2021 (background
swaps, "Mixed-Rand", and "Only-BG" images) and Ross et al., IJCAI 2017 (masked evidence).

Donors come from a bank of this rank's recent trusted backgrounds (``BackgroundBank``): no extra data, nothing
crosses workers.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.nn.functional as F

from megl_ray.model.saliency import upsample

KEEP_THRESHOLD = 0.5
MASK_DILATION = 5  # px: ground-truth masks can be the strokes alone; keep their anti-aliased rim with them
PRIOR_SUPPORT = 0.1
"""Where Ā, upsampled, reaches this fraction of its peak: the part of the image where annotated evidence occurs."""
BACKGROUND_BANK = 64
"""Donor backgrounds kept per rank: with maps on 10 % of the samples a micro-batch of 16 has one or two trusted
images, often none to swap with; the bank gives every trusted image donors of other classes."""
COUNTERFACTUAL_VIEWS = 4
"""Counterfactuals per trusted image per step, each on a donor drawn from the bank: the annotated tenth of the data
is what teaches the classifier to ignore backgrounds, so it is shown against several."""


def explained_region(
    saliency: torch.Tensor,
    masks: torch.Tensor | None,
    has_mask: torch.Tensor,
    size: tuple[int, int],
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1, H, W) float {0, 1}: the dilated ground-truth region for samples with a mask; for the others the
    support of the evidence prior Ā (where its upsampled value reaches ``PRIOR_SUPPORT`` of its peak) when ``prior``
    is given, else Â ≥ 0.5."""
    if prior is not None:
        p = F.interpolate(prior.float()[None, None], size=size, mode="bilinear", align_corners=False)
        region = (p >= PRIOR_SUPPORT * p.max()).float().expand(saliency.shape[0], 1, *size)
    else:
        region = (upsample(saliency.detach().float(), size) >= KEEP_THRESHOLD).float()
    if masks is not None:  # selected per sample below: no host read of whether any sample has a mask
        gt = F.interpolate(masks.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)
        gt = F.max_pool2d((gt >= KEEP_THRESHOLD).float(), MASK_DILATION, stride=1, padding=MASK_DILATION // 2)
        region = torch.where(has_mask.view(-1, 1, 1, 1), gt, region)
    return region


def _mean_outside(pixels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, 1): each image's mean colour outside its region (the whole image's where the region is all)."""
    outside = 1 - region
    total = outside.sum(dim=(2, 3), keepdim=True)
    mean_out = (pixels * outside).sum(dim=(2, 3), keepdim=True) / total.clamp_min(1.0)
    return torch.where(total > 0, mean_out, pixels.mean(dim=(2, 3), keepdim=True))


def background_images(pixels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """I_bg = (1 − R) ⊙ I + R ⊙ mean colour of I outside R: the object blanked, the background (and any shortcut
    in it) kept. ``pixels`` (B, C, H, W), ``region`` (B, 1, H, W) in {0, 1}."""
    return (1 - region) * pixels + region * _mean_outside(pixels, region)


def counterfactual_images(pixels: torch.Tensor, region: torch.Tensor, backgrounds: torch.Tensor) -> torch.Tensor:
    """I_cf = R ⊙ I + (1 − R) ⊙ a donor's background: ``pixels`` (B, C, H, W), ``region`` (B, 1, H, W) in {0, 1},
    ``backgrounds`` (B, C, H, W) donors' ``background_images``."""
    return region * pixels + (1 - region) * backgrounds


class BackgroundBank:
    """The last ``size`` trusted backgrounds (object blanked) of this rank, the donors of the counterfactuals:
    detached images, not training state (a resumed run starts empty and refills within a step)."""

    def __init__(self, size: int = BACKGROUND_BANK):
        self.items: deque[torch.Tensor] = deque(maxlen=size)

    def add(self, backgrounds: torch.Tensor) -> None:
        self.items.extend(backgrounds.detach().unbind(0))

    def draw(self, n: int) -> torch.Tensor:
        """``n`` backgrounds drawn uniformly with replacement (torch's global RNG: seeded and checkpointed with the
        run); the bank must not be empty."""
        pool = torch.stack(list(self.items))
        return pool[torch.randint(len(pool), (n,), device=pool.device)]

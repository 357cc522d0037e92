"""Grad-CAM saliency Â, batched over the whole batch and differentiable with respect to the classifier.

For a head that is global-average-pool + linear, Grad-CAM's channel weights are the gradients of the class score
averaged over the map: d(W_y · mean(A)) / dA_k(i, j) = W[y, k] / (h·w), a constant. So
Grad-CAM = relu(Σ_k W[y, k]/(h·w) · A_k), which is CAM (Zhou et al. 2016) up to a positive factor that the
per-sample normalisation removes. The closed form needs no double backward — which matters because a double backward
(``autograd.grad(create_graph=True)``) fails under DeepSpeed ZeRO-3 and is costly everywhere. Any other head takes
the autograd path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from megl_ray.model.precision import compute_in_fp32

EPS = 1e-8


@compute_in_fp32
def normalize_per_sample(cam: torch.Tensor) -> torch.Tensor:
    """Scale each (h, w) map to [0, 1] by its maximum (Grad-CAM is already ≥ 0 after the ReLU).

    Dividing by the max rather than min-max keeps a uniform positive map uniform (min-max would zero it) and keeps
    the operation differentiable almost everywhere."""
    peak = cam.flatten(1).amax(dim=1).clamp_min(EPS)
    return cam / peak.view(-1, 1, 1)


@compute_in_fp32
def closed_form_cam(features: torch.Tensor, head_weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CAM for a GAP + linear head: relu(Σ_k W[y, k]·A_k), normalised per sample. features (B, C, h, w) → (B, h, w)."""
    weights = head_weight[target].to(features.dtype)  # (B, C)
    cam = torch.einsum("bc,bchw->bhw", weights, features)
    return normalize_per_sample(F.relu(cam))


def autograd_gradcam(
    features: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, create_graph: bool = True
) -> torch.Tensor:
    """Grad-CAM by autograd: α_k = mean_ij d y_c / d A_k(i, j); relu(Σ_k α_k A_k), normalised per sample.

    ``logits`` must have been computed from ``features`` in the current graph. With ``create_graph`` the result is
    differentiable with respect to the parameters (a double backward in the training step)."""
    score = logits.gather(1, target.view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(score, features, create_graph=create_graph)
    alpha = grads.mean(dim=(2, 3), keepdim=True)
    return normalize_per_sample(F.relu((alpha * features).sum(dim=1)))


def gradcam(
    features: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    head_weight: torch.Tensor | None,
    create_graph: bool = True,
) -> torch.Tensor:
    """The one saliency of MEGL: closed form when a GAP + linear head's weight is given, autograd otherwise."""
    if head_weight is not None:
        return closed_form_cam(features, head_weight, target)
    with torch.enable_grad():  # the autograd path needs a graph even during evaluation
        return autograd_gradcam(features, logits, target, create_graph=create_graph and torch.is_grad_enabled())


def per_image_gradcam(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], pixels: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The MEGL authors' approach, kept as a baseline for ``bench/saliency_overhead.py``: one forward and one
    autograd Grad-CAM per image in a Python loop. ``forward`` maps pixels to (logits, features)."""
    maps = []
    for i in range(pixels.shape[0]):
        logits, features = forward(pixels[i : i + 1])
        maps.append(autograd_gradcam(features, logits, target[i : i + 1], create_graph=True))
    return torch.cat(maps)


def upsample(saliency: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, h, w) saliency → (B, 1, H, W), bilinear: for I ⊙ Â and for overlays on the image."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(saliency.unsqueeze(1), size=size, mode="bilinear", align_corners=False)


def resize_map(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) or (H, W) maps → the saliency grid by area averaging (ground-truth masks, the dataset prior)."""
    squeeze = maps.dim() == 2
    x = maps.unsqueeze(0) if squeeze else maps
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.adaptive_avg_pool2d(x.unsqueeze(1), size).squeeze(1)
    return x.squeeze(0) if squeeze else x

"""The MEGL objective (arXiv 2411.13053), one function per term and one for the combination.

Per sample i:
    L_i = CE_i + λ_text·L_text,i + λ_vis·[I_V,i·L_visual,i + (1 − I_V,i)·λ_dc·L_dc,i]
          (+ λ_rrr·I_V,i·L_rrr,i + T_i·[λ_cf·CE(f(I_cf,i), y_i) + λ_bg·KL(U‖f(I_bg,i))]: the options
          ``loss.rrr_weight``, ``loss.counterfactual_weight`` and ``loss.background_weight``; T_i says whether
          sample i's explained region is trusted, see ``model/counterfactual.py``)
and the batch loss is the mean of L_i. Every term is returned per sample, so that the masking by I_V is per sample,
never per batch. No Ray here: these are plain tensor functions, testable on small hand-made tensors.

Normalisations (documented because the paper leaves them open):
- L_visual is the mean absolute difference over the saliency grid (‖Â − A‖₁ divided by h·w), so its scale does not
  depend on the backbone's grid size. A is the ground-truth map area-resized to Â's grid.
- L_dc treats Â and Ā as spatial distributions: each map plus ``eps`` is divided by its sum, then
  KL(P‖Q) = Σ P·log(P/Q). Hence L_dc = 0 when Â is proportional to Ā (in particular equal) and > 0 otherwise.
- L_text is, per sample, the mean token negative log-likelihood of the reference rationale (prompt and image tokens
  are excluded by label −100); a sample with no rationale tokens contributes 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megl_ray.config import LossConfig
from megl_ray.data.tokens import IGNORE_INDEX
from megl_ray.model.precision import compute_in_fp32
from megl_ray.model.saliency import resize_map


@compute_in_fp32
def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy, (B,)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


@compute_in_fp32
def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL of the labelled tokens, (B,). logits (B, T, V), labels (B, T) with −100."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return nll.sum(dim=1) / counts.clamp_min(1)


def rationale_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T−1) bool: the positions whose *next* token is a labelled rationale token — the only positions whose
    logits the text loss needs (image and prompt positions, ~90% of a LLaVA sequence, need none)."""
    return labels[:, 1:] != IGNORE_INDEX


def rationale_indices(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of ``rationale_positions(labels)``. The training loop takes them from the labels still on
    the host (``training.host_batch``), where counting them costs no wait for the device."""
    return rationale_positions(labels).nonzero(as_tuple=True)


@compute_in_fp32
def text_loss_at(
    logits: torch.Tensor, labels: torch.Tensor, positions: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """``text_loss`` from the logits at ``rationale_positions(labels)`` only: logits (N, V), in the row-major order
    of those positions (``positions``, their (rows, columns), when already known), labels (B, T). Same value as
    ``text_loss`` on full-sequence logits."""
    keep = rationale_positions(labels)
    rows, cols = positions if positions is not None else rationale_indices(labels)
    targets = labels[:, 1:][rows, cols]
    nll = F.cross_entropy(logits, targets, reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return sums / keep.sum(dim=1).clamp_min(1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B,) where ``mask`` (B,) holds, computed on the device; NaN where it holds nowhere (the
    log window's "absent"). ``values[mask].mean()`` would read the mask's count on the host."""
    weights = mask.to(values.dtype)
    count = weights.sum()
    mean = (values * weights).sum() / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps.unsqueeze(1)
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out.squeeze(1)


MARGIN_LOW, MARGIN_HIGH = 0.4, 0.6  # the ``margin`` transform's bounds around mIoU's 0.5-of-peak threshold


@compute_in_fp32
def visual_loss(
    saliency: torch.Tensor, target: torch.Tensor, transform: str = "none", gaussian_sigma: float = 1.0
) -> torch.Tensor:
    """Per-sample L_visual, (B,), against ground-truth maps ``target`` (B, H, W) in [0, 1] resized to Â's grid.

    Transforms of the explanation-supervision literature (Gao et al., RES, NeurIPS 2022, and the methods it
    compares):
    - ``none``: mean |Â − A|.
    - ``gradia``: the annotation as a hard region (A > 0.5): attention is pulled to 1 inside, pushed to 0 outside.
    - ``haics``: only attention outside the annotated region is penalised, mean(Â·(1 − A)): annotators mark where
      the evidence is, not how much of it every pixel holds.
    - ``gaussian``: A blurred by a Gaussian (σ in grid cells) and rescaled to peak 1, tolerating imprecise borders.
    - ``margin``: only the side of the threshold mIoU reads (0.5 of the peak) with a margin: inside the region
      (A > 0.5) Â is pushed up to 0.6, outside down to 0.4, and nothing more — the CAM may still peak on the
      discriminative part CE wants, as long as the rest of the object stays above the threshold.
    """
    target = resize_map(target.to(saliency.dtype), tuple(saliency.shape[-2:]))
    if transform == "none":
        diff = saliency - target
    elif transform == "gradia":
        diff = saliency - (target > 0.5).to(saliency.dtype)
    elif transform == "haics":
        diff = saliency * (1 - target)
    elif transform == "margin":
        inside = (target > 0.5).to(saliency.dtype)
        diff = inside * F.relu(MARGIN_HIGH - saliency) + (1 - inside) * F.relu(saliency - MARGIN_LOW)
    elif transform == "gaussian":
        blurred = _gaussian_blur(target, gaussian_sigma)
        blurred = blurred / blurred.flatten(1).amax(dim=1).clamp_min(1e-8).view(-1, 1, 1)
        diff = saliency - blurred
    else:
        raise ValueError(f"unknown visual transform '{transform}' (none, gradia, haics, gaussian, margin)")
    return diff.abs().flatten(1).mean(dim=1)


def as_distribution(maps: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, h, w) non-negative maps → spatial probability distributions, (B, h·w)."""
    flat = maps.flatten(1) + eps
    return flat / flat.sum(dim=1, keepdim=True)


@compute_in_fp32
def distribution_consistency_loss(saliency: torch.Tensor, prior: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-sample KL(Â ‖ Ā), (B,). ``prior`` is the dataset's mean normalised ground-truth map (any resolution;
    it is area-resized to Â's grid)."""
    prior = resize_map(prior.to(saliency.dtype), tuple(saliency.shape[-2:]))
    p = as_distribution(saliency, eps)
    q = as_distribution(prior.expand_as(saliency), eps)
    return (p * (p.log() - q.log())).sum(dim=1)


def input_gradient_penalty(input_grad: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample L_rrr, (B,): the "right reasons" term of Ross, Hughes & Doshi-Velez, *Right for the Right
    Reasons: Training Differentiable Models by Constraining their Explanations*, IJCAI 2017 (arXiv 1703.03717):
    Σ_d ((1 − A)_d · ∂/∂x_d Σ_k log p_k)², summed over the input's elements d (channels × pixels) as in the paper,
    so its weight λ_rrr is on the paper's scale (they use 1000 for Decoy-MNIST).

    ``input_grad`` (B, C, H, W) is the gradient of the summed log-probabilities with respect to the [0, 1] input
    pixels (taken with ``create_graph=True`` so this term trains the classifier: a double backward), ``target``
    (B, h, w) the ground-truth evidence map in [0, 1], bilinearly resized to the input. Unlike L_visual, which
    constrains the last-stage CAM (whose features can carry a shortcut through their receptive fields), this
    constrains what the prediction is sensitive to, pixel by pixel: any region outside the evidence (a decoy) that
    moves the prediction is penalised."""
    outside = 1 - F.interpolate(
        target.to(input_grad.dtype).unsqueeze(1),
        size=tuple(input_grad.shape[-2:]),
        mode="bilinear",
        align_corners=False,
    )
    return (outside * input_grad).pow(2).flatten(1).sum(dim=1)


def uniform_kl(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(U‖softmax(logits)), (B,), U the uniform distribution over the K classes:
    −log K − (1/K)·Σ_k log p_k. 0 exactly when the prediction is uniform (says nothing), > 0 otherwise. The target of
    the background-only images of ``loss.background_weight``: with the object blanked, no class should win."""
    log_p = F.log_softmax(logits.float(), dim=1)
    return -math.log(logits.shape[1]) - log_p.mean(dim=1)


def visual_ramp(step: int, total_steps: int, start: float, end: float) -> float:
    """Factor in [0, 1] on λ_vis at optimizer step ``step`` (0-based) of ``total_steps``: 0 before ``start``·total,
    linear up to 1 at ``end``·total, 1 after; always 1 when ``end`` is 0 (no ramp, the paper's constant weight)."""
    if end <= 0:
        return 1.0
    progress = step / max(1, total_steps)
    if progress >= end:
        return 1.0
    if progress < start:
        return 0.0
    return (progress - start) / max(end - start, 1e-12)


@compute_in_fp32
def megl_objective(
    ce: torch.Tensor,
    text: torch.Tensor | None,
    visual: torch.Tensor | None,
    dc: torch.Tensor | None,
    has_mask: torch.Tensor,
    weights: LossConfig,
    sample_weight: torch.Tensor | None = None,
    rrr: torch.Tensor | None = None,
    counterfactual: torch.Tensor | None = None,
    visual_scale: float = 1.0,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of CE + λ_text·L_text + λ_vis·[I_V·L_visual + (1 − I_V)·λ_dc·L_dc] (+ λ_rrr·I_V·L_rrr
    and λ_cf·L_cf + λ_bg·L_bg, the options ``loss.rrr_weight``, ``loss.counterfactual_weight`` and
    ``loss.background_weight``; ``counterfactual`` is the per-sample CE on the counterfactual-background images,
    ``background`` the per-sample KL to uniform on the background-only images, both 0 for untrusted samples);
    None terms are 0. ``visual_scale`` multiplies λ_vis
    (the ramp of ``loss.visual_ramp_start/end``, see :func:`visual_ramp`).

    ``sample_weight`` (B,) makes it a weighted mean; rows that only pad a worker's shard carry weight 0."""
    total = ce
    if text is not None:
        total = total + weights.text_weight * text
    indicator = has_mask.to(ce.dtype)
    vis = torch.zeros_like(ce)
    if visual is not None:
        # torch.where, not a product, so a NaN-free but meaningless L1 against an absent mask can't leak in.
        vis = torch.where(has_mask, visual, torch.zeros_like(visual))
    if dc is not None:
        vis = vis + (1 - indicator) * weights.dc_weight * dc
    per_sample = total + weights.visual_weight * visual_scale * vis
    if rrr is not None:
        per_sample = per_sample + weights.rrr_weight * torch.where(has_mask, rrr, torch.zeros_like(rrr))
    if counterfactual is not None:
        per_sample = per_sample + weights.counterfactual_weight * counterfactual
    if background is not None:
        per_sample = per_sample + weights.background_weight * background
    if sample_weight is None:
        return per_sample.mean()
    sample_weight = sample_weight.to(per_sample.dtype)
    return (sample_weight * per_sample).sum() / sample_weight.sum().clamp_min(1e-12)

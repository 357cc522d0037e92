"""Evaluation metrics of MEGL: classification and visual explanation (saliency vs. ground-truth mask); the text
metrics (generated vs. reference rationales) are ``megl_ray.evaluation.text_metrics``, so that the training loop's
validation does not load the language-metric libraries. No Ray; every number comes from a kept library.

Streaming accumulators (``update`` per batch, ``compute`` at the end) serve both ``megl_ray.evaluate`` and the
training loop's per-epoch validation:

* ``ClassificationMetrics.update(probs, labels)`` — torchmetrics (accuracy, macro P/R/F1, one-vs-rest AUC);
* ``SaliencyMetrics.update(saliency, masks, has_mask)`` — mIoU (torchmetrics ``MeanIoU``) and the pointing game;
* ``text_metrics.TextMetrics.update(hypotheses, references)`` — BLEU-4, METEOR, CIDEr, ROUGE-L, text similarity.

The first two are torchmetrics metrics underneath, so under ``torch.distributed`` their ``compute`` already reduces
over all ranks. Text metrics are corpus-level (BLEU, CIDEr's IDF), so they keep the strings and score at the end.
``docs/evaluation.md`` defines every key.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MulticlassStatScores,
)
from torchmetrics.functional.segmentation import mean_iou
from torchmetrics.segmentation import MeanIoU

log = logging.getLogger("megl_ray.evaluation.metrics")

SALIENCY_THRESHOLD = 0.5
"""A pixel is 'explained' when the upsampled saliency, divided by its per-sample maximum, is ≥ this."""
MASK_THRESHOLD = 0.5
"""A ground-truth mask pixel (in [0, 1]) is 'object' when ≥ this."""


def finite_float(x: Any) -> float | None:
    """A finite Python float, or None for NaN/inf/None (JSON has no NaN)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------ classification


class ClassificationMetrics:
    """Accuracy, macro precision/recall/F1, macro one-vs-rest AUC and a per-class table, from torchmetrics.

    ``macro_*`` are torchmetrics' macro averages (a class that is neither in the targets nor predicted is left out
    of the mean). ``auc`` is the mean of torchmetrics' per-class one-vs-rest AUROC over the classes that occur in
    the targets: torchmetrics' own macro would count a class without positives as AUC 0. None when no class
    occurs (or the split holds a single class, where one-vs-rest AUC is undefined). ``per_class`` lists, in class-id
    order, support, predicted count, precision, recall, F1 and AUC; a ratio with a zero denominator is None.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        k = num_classes
        self.metrics = MetricCollection(
            {
                "accuracy": MulticlassAccuracy(k, average="micro"),
                "macro_precision": MulticlassPrecision(k, average="macro"),
                "macro_recall": MulticlassRecall(k, average="macro"),
                "macro_f1": MulticlassF1Score(k, average="macro"),
                "precision": MulticlassPrecision(k, average=None),
                "recall": MulticlassRecall(k, average=None),
                "f1": MulticlassF1Score(k, average=None),
                "auroc": MulticlassAUROC(k, average=None, thresholds=None),  # exact (no binning)
            }
        )
        # tp, fp, tn, fn, support per class: a metric too, so that it is reduced over ranks like the others
        self.stats = MulticlassStatScores(k, average=None)

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """probs (B, K) class probabilities, labels (B,) class ids."""
        probs, labels = probs.detach().float().cpu(), labels.detach().long().cpu()
        self.metrics.update(probs, labels)
        self.stats.update(probs, labels)

    def reset(self) -> None:
        self.metrics.reset()
        self.stats.reset()

    def compute(self) -> dict[str, Any]:
        with warnings.catch_warnings():  # torchmetrics warns when compute() comes before any update()
            warnings.simplefilter("ignore", UserWarning)
            tp, fp, _, _, support = self.stats.compute().long().unbind(dim=1)
        predicted = tp + fp
        if int(support.sum()) == 0:
            return {
                "accuracy": None,
                "macro_precision": None,
                "macro_recall": None,
                "macro_f1": None,
                "auc": None,
                "per_class": [],
            }
        with warnings.catch_warnings():  # torchmetrics warns for classes without positives; `auc` handles them
            warnings.simplefilter("ignore", UserWarning)
            values = self.metrics.compute()
        present = support > 0
        auroc = values["auroc"]
        auc = finite_float(auroc[present].mean()) if int(present.sum()) >= 2 else None
        # Undefined ratios (no sample of the class, nothing predicted as it) are None here, not torchmetrics' 0.
        per_class = [
            {
                "class": name,
                "support": int(support[i]),
                "predicted": int(predicted[i]),
                "precision": finite_float(values["precision"][i]) if int(predicted[i]) else None,
                "recall": finite_float(values["recall"][i]) if bool(present[i]) else None,
                "f1": finite_float(values["f1"][i]) if bool(present[i]) or int(predicted[i]) else None,
                "auc": finite_float(auroc[i]) if bool(present[i]) and auc is not None else None,
            }
            for i, name in enumerate(self.class_names)
        ]
        return {
            "accuracy": finite_float(values["accuracy"]),
            "macro_precision": finite_float(values["macro_precision"]),
            "macro_recall": finite_float(values["macro_recall"]),
            "macro_f1": finite_float(values["macro_f1"]),
            "auc": auc,
            "per_class": per_class,
        }


# ------------------------------------------------------------------------------------------------------ saliency


def upsample_saliency(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) saliency → (B, H, W), bilinear (``align_corners=False``, as the model's own overlays), then divided
    by each map's maximum so the threshold is relative to the map's peak (an all-zero map stays zero)."""
    up = F.interpolate(saliency.detach().float().unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(
        1
    )
    peak = up.flatten(1).amax(dim=1).clamp_min(1e-12)
    return up / peak.view(-1, 1, 1)


def binarize_saliency(saliency: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The predicted explanation region: upsampled, max-normalised saliency ≥ ``SALIENCY_THRESHOLD`` (bool)."""
    return upsample_saliency(saliency, size) >= SALIENCY_THRESHOLD


def saliency_iou(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU (B,) of the binarised saliency with the binarised mask (torchmetrics ``mean_iou`` of the
    foreground class); NaN where both regions are empty."""
    pred = binarize_saliency(saliency, tuple(masks.shape[-2:])).long()
    target = (masks.detach().float().cpu() >= MASK_THRESHOLD).long()
    return mean_iou(pred.cpu(), target, num_classes=2, include_background=False, per_class=True, input_format="index")[
        :, 0
    ]


def pointing_hits(saliency: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pointing game (Zhang et al. 2016) without tolerance: whether the upsampled saliency's argmax pixel (the first
    one on ties) lies inside the binarised mask. (B,) bool."""
    up = upsample_saliency(saliency, tuple(masks.shape[-2:])).cpu()
    peak = up.flatten(1).argmax(dim=1)
    inside = (masks.detach().float().cpu() >= MASK_THRESHOLD).flatten(1)
    return inside.gather(1, peak.view(-1, 1)).squeeze(1)


class SaliencyMetrics:
    """mIoU and pointing game over the samples that have a ground-truth mask.

    ``miou``: mean over those samples of IoU(saliency region, mask region) — saliency bilinearly upsampled to the
    mask size, divided by its maximum and thresholded at 0.5; mask thresholded at 0.5 (torchmetrics ``MeanIoU``,
    which leaves out a sample whose two regions are both empty). ``pointing_game``: fraction of those samples whose
    saliency peak falls inside the mask. Both None when no sample has a mask.
    """

    def __init__(self) -> None:
        self.iou = MeanIoU(num_classes=2, include_background=False, input_format="index")
        self.pointing = MeanMetric()
        self.count = SumMetric()

    def update(self, saliency: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> None:
        """saliency (B, h, w) in [0, 1]; masks (B, M, M) in [0, 1]; has_mask (B,) bool (others are ignored)."""
        keep = has_mask.detach().bool().cpu()
        if not bool(keep.any()):
            return
        sal, gt = saliency.detach().cpu()[keep], masks.detach().float().cpu()[keep]
        pred = binarize_saliency(sal, tuple(gt.shape[-2:])).long()
        self.iou.update(pred, (gt >= MASK_THRESHOLD).long())
        self.pointing.update(pointing_hits(sal, gt).float())
        self.count.update(torch.tensor(float(keep.sum())))

    def reset(self) -> None:
        for metric in (self.iou, self.pointing, self.count):
            metric.reset()

    def compute(self) -> dict[str, Any]:
        with warnings.catch_warnings():  # torchmetrics warns when compute() comes before any update()
            warnings.simplefilter("ignore", UserWarning)
            n = int(self.count.compute())
            if n == 0:
                return {"miou": None, "pointing_game": None, "mask_samples": 0}
            return {
                "miou": finite_float(self.iou.compute()),
                "pointing_game": finite_float(self.pointing.compute()),
                "mask_samples": n,
            }

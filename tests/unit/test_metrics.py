"""Every metric of megl_ray.evaluation.metrics against a hand computation or the reference library, on tiny fixed
examples."""

import logging
import math

import pytest
import torch

from megl_ray.evaluation import metrics as M
from megl_ray.evaluation import text_metrics as T

# --------------------------------------------------------------------------------------------- classification

LABELS = torch.tensor([0, 0, 1, 1, 2, 2])
PROBS = torch.tensor(
    [
        [0.6, 0.3, 0.1],  # 0 → 0
        [0.3, 0.5, 0.2],  # 0 → 1
        [0.2, 0.7, 0.1],  # 1 → 1
        [0.1, 0.8, 0.1],  # 1 → 1
        [0.1, 0.2, 0.7],  # 2 → 2
        [0.5, 0.1, 0.4],
    ]
)  # 2 → 0


def test_classification_metrics_by_hand_and_auc_against_sklearn():
    from sklearn.metrics import roc_auc_score

    m = M.ClassificationMetrics(3, ["a", "b", "c"])
    m.update(PROBS[:4], LABELS[:4])  # streaming: two batches
    m.update(PROBS[4:], LABELS[4:])
    r = m.compute()
    # per class (tp, fp, fn): a (1, 1, 1), b (2, 1, 0), c (1, 0, 1)
    precision, recall = [1 / 2, 2 / 3, 1.0], [1 / 2, 1.0, 1 / 2]
    f1 = [2 * p * q / (p + q) for p, q in zip(precision, recall)]
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["macro_precision"] == pytest.approx(sum(precision) / 3)
    assert r["macro_recall"] == pytest.approx(sum(recall) / 3)
    assert r["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert r["auc"] == pytest.approx(
        roc_auc_score(LABELS.numpy(), PROBS.numpy(), multi_class="ovr", average="macro"), abs=1e-6
    )
    assert [row["class"] for row in r["per_class"]] == ["a", "b", "c"]
    assert [row["support"] for row in r["per_class"]] == [2, 2, 2]
    assert [row["predicted"] for row in r["per_class"]] == [2, 3, 1]
    assert [row["precision"] for row in r["per_class"]] == pytest.approx(precision)
    assert [row["f1"] for row in r["per_class"]] == pytest.approx(f1)


def test_auc_leaves_out_a_class_absent_from_the_targets():
    from sklearn.metrics import roc_auc_score

    probs = torch.cat([PROBS * 0.9, torch.full((6, 1), 0.1)], dim=1)  # a 4th class nobody has
    m = M.ClassificationMetrics(4)
    m.update(probs, LABELS)
    r = m.compute()
    by_hand = sum(roc_auc_score((LABELS == c).numpy(), probs[:, c].numpy()) for c in range(3)) / 3
    assert r["auc"] == pytest.approx(by_hand, abs=1e-6)
    last = r["per_class"][3]
    assert last["support"] == 0 and last["auc"] is None and last["recall"] is None and last["precision"] is None


def test_empty_classification_gives_nulls():
    r = M.ClassificationMetrics(3).compute()
    assert r["accuracy"] is None and r["auc"] is None and r["per_class"] == []


# --------------------------------------------------------------------------------------------------- saliency


def test_iou_and_pointing_game_by_hand():
    m = M.SaliencyMetrics()
    # 4x4 map, same size as the mask (no resampling). Divided by its max 0.8, the region ≥ 0.5 is
    # {(0,0) 1.0, (0,1) 0.5625, (1,0) 0.75}; (0,1) is in only because of the normalisation.
    sal = torch.tensor([[[0.8, 0.45, 0.1, 0.0], [0.6, 0.3, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.2]]])
    # soft mask ≥ 0.5: {(0,0), (1,0), (1,1), (2,0)} → intersection 2, union 5 → IoU 0.4; peak (0,0) inside: hit
    mask = torch.tensor([[[1.0, 0.2, 0, 0], [0.9, 0.6, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]]])
    m.update(sal, mask, torch.tensor([True]))
    # 2x2 → 4x4 bilinear (align_corners=False): row 0 = [1, .75, .25, 0], row 1 = [.75, .5625, .1875, 0], rest < .5
    # → region = top-left 2x2; mask = that block plus (0,2) → IoU 4/5; peak (0,0) inside: hit
    small = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask2 = torch.zeros(1, 4, 4)
    mask2[0, :2, :2] = 1
    mask2[0, 0, 2] = 1
    assert M.upsample_saliency(small, (4, 4))[0, :2] == pytest.approx(
        torch.tensor([[1, 0.75, 0.25, 0], [0.75, 0.5625, 0.1875, 0]])
    )
    # a batch of two whose second sample has no mask: it must not count
    m.update(torch.cat([small, small]), torch.cat([mask2, torch.ones(1, 4, 4)]), torch.tensor([True, False]))
    # peak at (3,3), outside the top-left mask: miss, IoU 0
    far = torch.zeros(1, 4, 4)
    far[0, 3, 3] = 1.0
    m.update(far, mask2, torch.tensor([True]))
    r = m.compute()
    assert r["mask_samples"] == 3
    assert r["miou"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert r["pointing_game"] == pytest.approx(2 / 3)
    assert M.pointing_hits(far, mask2).tolist() == [False]
    assert M.saliency_iou(sal, mask).tolist() == pytest.approx([0.4])


def test_saliency_metrics_without_masks_are_null():
    m = M.SaliencyMetrics()
    m.update(torch.rand(2, 4, 4), torch.ones(2, 8, 8), torch.tensor([False, False]))
    assert m.compute() == {"miou": None, "pointing_game": None, "mask_samples": 0}


# ------------------------------------------------------------------------------------------------------- text

HYPS = ["the cat sat on the mat", "a dog runs in the park"]
REFS = [["the cat is on the mat", "there is a cat on the mat", "a cat sits on a mat"], ["a dog is running in the park"]]


def test_bleu4_is_sacrebleu_corpus_bleu_with_all_references():
    import sacrebleu

    streams = [[REFS[0][0], REFS[1][0]], [REFS[0][1], None], [REFS[0][2], None]]
    assert T.bleu4(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score / 100)
    assert T.bleu4(["the cat is on the mat"], [["the cat is on the mat"]]) == pytest.approx(1.0)
    assert T.bleu4([], []) is None


def test_rouge_l_by_hand_max_over_references():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": P = R = F = 5/6
    assert T.rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # the best reference counts, not the mean: adding a worse one changes nothing
    assert T.rouge_l(["the cat sat on the mat"], [["a dog", "the cat is on the mat"]]) == pytest.approx(5 / 6)
    # averaged over hypotheses: exact match (1) and 5/6
    assert T.rouge_l(["a dog", "the cat sat on the mat"], [["a dog"], ["the cat is on the mat"]]) == pytest.approx(
        (1 + 5 / 6) / 2
    )


def test_cider_is_pycocoevalcap_on_coco_tokens():
    from pycocoevalcap.cider.cider import Cider

    assert T.coco_tokenize("The cat, sat on the mat.") == "the cat sat on the mat"
    gts = {str(i): [T.coco_tokenize(r) for r in refs] for i, refs in enumerate(REFS)}
    res = {str(i): [T.coco_tokenize(h)] for i, h in enumerate(HYPS)}
    expected, _ = Cider().compute_score(gts, res)
    assert T.cider(HYPS, REFS) == pytest.approx(expected)
    assert T.cider(HYPS, REFS) > T.cider(["a dog runs in the park", "the cat sat on the mat"], REFS)


@pytest.mark.skipif(not T.java_available(), reason="METEOR needs Java (a JRE on PATH); none found")
def test_meteor_is_pycocoevalcap_meteor():
    from pycocoevalcap.meteor.meteor import Meteor

    hyps = [*HYPS, "the cat is on the mat", "purple quantum banana"]  # + an exact match and an unrelated one
    refs = [*REFS, ["the cat is on the mat"], ["the cat is on the mat"]]
    gts = {str(i): [T.coco_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {str(i): [T.coco_tokenize(h)] for i, h in enumerate(hyps)}
    scorer = Meteor()  # each JVM start loads the paraphrase table (seconds): two starts in all here
    expected, per_sample = scorer.compute_score(gts, res)
    del scorer
    assert T.meteor(hyps, refs) == pytest.approx(expected)
    assert per_sample[2] > 0.95 and per_sample[3] < 0.1


def test_meteor_without_java_is_null_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(T.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="megl_ray.evaluation.metrics"):
        assert T.meteor(HYPS, REFS) is None
    assert "java not found" in caplog.text


def test_text_similarity_identical_is_one_and_unrelated_is_lower():
    same = T.text_similarity(["a red square in the upper left"], [["a red square in the upper left"]])
    assert same == pytest.approx(1.0, abs=1e-4)
    # max over references: the matching second reference decides
    assert T.text_similarity(["a dog runs"], [["stock prices fell", "a dog runs"]]) == pytest.approx(1.0, abs=1e-4)
    unrelated = T.text_similarity(["a red square in the upper left"], [["stock prices fell sharply on monday"]])
    assert unrelated < 0.5
    related = T.text_similarity(["a red square at the top left"], [["a red square in the upper left"]])
    assert unrelated < related < 1.0
    assert T.embedding_model() is T.embedding_model()  # loaded once


def test_text_metrics_accumulate_and_report_every_key():
    t = T.TextMetrics()
    t.update(HYPS[:1], REFS[:1])
    t.update(HYPS[1:], REFS[1:])
    r = t.compute()
    assert set(r) == {"bleu4", "meteor", "rouge_l", "cider", "text_similarity"}
    assert r["bleu4"] == pytest.approx(T.bleu4(HYPS, REFS)) and r["rouge_l"] == pytest.approx(T.rouge_l(HYPS, REFS))
    assert all(v is None or math.isfinite(v) for v in r.values())
    assert T.TextMetrics().compute()["bleu4"] is None
    with pytest.raises(ValueError):
        t.update(["x"], [[]])

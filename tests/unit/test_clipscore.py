"""CLIPScore on a small real CLIP saved to disk: the scorer equals a hand computation of w·max(cos, 0), w = 2.5,
including the clipping at zero, and a directory that is not a CLIP checkpoint is one clear error."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megl_ray.errors import UserError
from megl_ray.evaluation.clipscore import CLIP_SCORE_WEIGHT, CLIPScorer, corpus_clip_score
from tests.support.tiny_clip import SENTENCES, save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 48), (64, 64), (32, 50), (80, 60), (45, 45)]
    return [
        Image.fromarray(rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8), "RGB") for i in range(n)
    ]


def _by_hand(clip_dir, images, texts, flip=False):
    """Hessel et al.'s formula, written out with transformers directly."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(clip_dir))
    proc = CLIPImageProcessor.from_pretrained(str(clip_dir))
    with torch.no_grad():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        v = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        t_in = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
        t = model.text_projection(model.text_model(**t_in).pooler_output)
    cos = torch.nn.functional.cosine_similarity(-v if flip else v, t, dim=-1).double().numpy()
    return cos, 2.5 * np.maximum(cos, 0.0)


def test_clip_score_matches_a_hand_computation(clip_dir):
    images, texts = _images(5), SENTENCES
    scorer = CLIPScorer(str(clip_dir))
    encoded = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    got = scorer.score_bytes(encoded, texts)
    cos, expected = _by_hand(clip_dir, images, texts)
    assert CLIP_SCORE_WEIGHT == 2.5 and got.shape == (5,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert corpus_clip_score(got) == pytest.approx(float(expected.mean()))
    # negate E_image: every cosine flips sign, so the pairs that scored > 0 now score 0 and the others −cos·2.5
    with torch.no_grad():
        scorer.model.visual_projection.weight.neg_()
    flipped = scorer.score(images, texts)
    np.testing.assert_allclose(flipped, 2.5 * np.maximum(-cos, 0.0), rtol=1e-5, atol=1e-6)
    assert ((got > 0) & (flipped == 0)).any() or ((got == 0) & (flipped > 0)).any()


def test_a_directory_without_clip_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--clip-path: cannot load"):
        CLIPScorer(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="model directory not found"):
        CLIPScorer(str(tmp_path / "missing"))
    assert corpus_clip_score(None) is None


def test_an_empty_rationale_scores_zero_and_leaves_the_others_as_they_were(clip_dir):
    images, texts = _images(3), SENTENCES[:3]
    scorer = CLIPScorer(str(clip_dir))
    full = scorer.score(images, texts)
    mixed = scorer.score(images, [texts[0], "  ", texts[2]])
    assert mixed[1] == 0.0
    np.testing.assert_allclose(mixed[[0, 2]], full[[0, 2]], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(scorer.score(images, ["", "", ""]), np.zeros(3))  # no (N, 0) ids reach CLIP

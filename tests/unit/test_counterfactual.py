"""The counterfactual options (loss.counterfactual_weight, loss.background_weight), by hand on small images."""

import pytest
import torch

from megl_ray.config import load_config
from megl_ray.model.counterfactual import (
    COUNTERFACTUAL_VIEWS,
    BackgroundBank,
    background_images,
    counterfactual_images,
    explained_region,
)


def test_the_region_is_the_dilated_mask_where_there_is_one_and_the_saliency_elsewhere():
    saliency = torch.zeros(2, 2, 2)
    saliency[:, 0, 0] = 1.0  # both maps point at the top-left quarter
    masks = torch.zeros(2, 8, 8)
    masks[0, 7, 7] = 1.0  # sample 0's annotated evidence: the bottom-right pixel
    region = explained_region(saliency, masks, torch.tensor([True, False]), (8, 8))
    assert region.shape == (2, 1, 8, 8) and set(region.unique().tolist()) <= {0.0, 1.0}
    expected0 = torch.zeros(8, 8)
    expected0[5:, 5:] = 1.0  # the pixel dilated by the 5×5 max-pool, clipped at the border
    assert torch.equal(region[0, 0], expected0)
    # sample 1 has no mask: its Â, upsampled bilinearly and thresholded at 0.5 (the cells around the peak)
    upsampled = torch.nn.functional.interpolate(
        saliency[1:].unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False
    )[0, 0]
    assert torch.equal(region[1, 0], (upsampled >= 0.5).float()) and region[1, 0, 0, 0] == 1
    assert region[1, 0, 7, 7] == 0


def test_with_a_prior_the_unannotated_region_is_where_the_prior_reaches_a_tenth_of_its_peak():
    prior = torch.tensor([[0.0, 0.0], [0.05, 1.0]])  # evidence only ever seen bottom-right (and a little left)
    saliency = torch.ones(1, 2, 2)  # Â everywhere: ignored when a prior is given
    region = explained_region(saliency, None, torch.tensor([False]), (2, 2), prior)
    assert region[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]  # 0.05 < 0.1 × peak: background
    # upsampled to 4×4 (bilinear, half-pixel centres) the support grows to the cells that interpolate ≥ 0.1
    big = explained_region(saliency, None, torch.tensor([False]), (4, 4), prior)[0, 0]
    up = torch.nn.functional.interpolate(prior[None, None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(big, (up >= 0.1).float()) and big[0, 0] == 0 and big[3, 3] == 1


def test_a_background_image_blanks_the_region_with_the_mean_colour_of_the_rest():
    pixels = torch.tensor([[[[0.2, 0.4], [0.6, 0.9]]]])
    region = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    assert torch.allclose(background_images(pixels, region)[0, 0], torch.tensor([[0.2, 0.4], [0.6, 0.4]]))
    everything = torch.ones_like(region)  # no background left: the image's own mean
    assert torch.allclose(background_images(pixels, everything), torch.full_like(pixels, 0.525))


def test_a_counterfactual_keeps_the_region_and_takes_the_rest_from_the_donor():
    pixels = torch.full((1, 3, 2, 2), 0.1)
    region = torch.zeros(1, 1, 2, 2)
    region[0, 0, 0, 0] = 1.0
    donor = torch.tensor([[[[0.2, 0.4], [0.6, 0.9]]]]).expand(1, 3, 2, 2)
    cf = counterfactual_images(pixels, region, donor)
    assert torch.allclose(cf[0, 0], torch.tensor([[0.1, 0.4], [0.6, 0.9]]))


def test_the_bank_keeps_the_last_backgrounds_and_draws_from_them():
    bank = BackgroundBank(size=3)
    bank.add(torch.arange(4.0).view(4, 1, 1, 1))  # four in, the oldest falls out
    assert [float(x) for x in bank.items] == [1.0, 2.0, 3.0]
    torch.manual_seed(0)
    drawn = bank.draw(50)
    assert drawn.shape == (50, 1, 1, 1) and set(drawn.flatten().tolist()) == {1.0, 2.0, 3.0}


def _model(*overrides):
    from megl_ray.model import build_megl_model

    cfg = load_config(None, ["loss.text_weight=0", "model.image_size=64", *overrides])
    torch.manual_seed(0)
    return build_megl_model(cfg, 3, corpus=["a b c", "one two three"])


def _count_classifier_images(model):
    seen = []
    forward = model.classifier.forward

    def spy(pixels, *args, **kwargs):
        seen.append(pixels.shape[0])
        return forward(pixels, *args, **kwargs)

    model.classifier.forward = spy
    return seen


def test_from_masks_only_the_annotated_samples_get_the_terms_each_on_several_donors():
    model = _model(
        "loss.counterfactual_weight=1.0",
        "loss.background_weight=2.0",
        "loss.counterfactual_regions=masks",
        "loss.visual_weight=0",  # so that the loss without annotated samples differs by the two terms alone
    )
    pixels, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    masks, has_mask = torch.zeros(4, 64, 64), torch.tensor([True, False, True, False])
    masks[:, 20:40, 20:40] = 1.0
    seen = _count_classifier_images(model)
    out = model(pixels, labels, masks=masks, has_mask=has_mask)
    # the batch, then the 2 annotated samples' counterfactuals (views each) and their 2 background images
    assert seen == [4, 2 * COUNTERFACTUAL_VIEWS + 2] and len(model.background_bank.items) == 2
    assert out.terms["cf"] > 0 and out.terms["bg"] > 0
    # the loss is CE plus the per-sample terms averaged over the whole batch (0 for the unannotated two)
    with_terms = out.loss.item()
    plain = model(pixels, labels, masks=masks, has_mask=torch.zeros(4, dtype=torch.bool)).loss.item()
    expected = (1.0 * out.terms["cf"].item() * 2 + 2.0 * out.terms["bg"].item() * 2) / 4
    assert with_terms - plain == pytest.approx(expected, rel=1e-4, abs=1e-5)
    out.loss.backward()
    assert model.classifier.head.weight.grad.abs().sum() > 0
    model.eval()
    assert "cf" not in model(pixels, labels).terms


def test_from_the_prior_every_sample_gets_one_counterfactual():
    model = _model("loss.counterfactual_weight=1.0")
    pixels, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    seen = _count_classifier_images(model)
    out = model(pixels, labels)  # no masks at all: the prior's support is every sample's region
    assert seen == [4, 4] and torch.isfinite(out.terms["cf"]) and "bg" not in out.terms


def test_without_an_annotated_sample_the_classifier_still_runs_once_and_adds_nothing():
    # ZeRO-3 gathers parameters inside module calls: every rank must make the same calls, whatever its batch holds
    model = _model("loss.counterfactual_weight=1.0", "loss.counterfactual_regions=masks", "loss.visual_weight=0")
    pixels, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    seen = _count_classifier_images(model)
    out = model(pixels, labels, masks=torch.zeros(4, 64, 64), has_mask=torch.zeros(4, dtype=torch.bool))
    assert seen == [4, COUNTERFACTUAL_VIEWS] and not model.background_bank.items  # a stand-in, not banked
    assert torch.isnan(out.terms["cf"]) and out.loss.item() == pytest.approx(out.terms["ce"].item(), rel=1e-6)

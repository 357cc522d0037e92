import math

import pytest
import torch

from megl_ray.config import LossConfig
from megl_ray.model import losses


def test_classification_loss_per_sample_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = [-math.log(math.exp(2) / (math.exp(2) + 1)), -math.log(1 / (1 + math.e))]
    assert torch.allclose(losses.classification_loss(logits, labels), torch.tensor(expected))


def test_text_loss_is_per_sample_mean_over_labelled_tokens_only():
    vocab = 3
    logits = torch.zeros(2, 4, vocab)
    logits[0, 1, 2] = math.log(2.0)  # predicts token at position 2 of sample 0: p(2) = 2/4
    labels = torch.tensor([[-100, -100, 2, 1], [-100, -100, -100, -100]])
    out = losses.text_loss(logits, labels)
    expected0 = (-math.log(0.5) + -math.log(1 / 3)) / 2
    assert out[0].item() == pytest.approx(expected0, rel=1e-6)
    assert out[1].item() == 0.0  # no rationale tokens → contributes nothing


def test_visual_loss_none_is_mean_absolute_difference_on_the_saliency_grid():
    sal = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1.0  # area-resized to 2×2: [[1, 0], [0, 0]]
    assert losses.visual_loss(sal, target).item() == pytest.approx((0 + 0 + 0.5 + 0) / 4)


def test_visual_transforms_match_hand_computation():
    sal = torch.tensor([[[0.8, 0.2], [0.4, 0.0]]])
    target = torch.tensor([[[0.6, 0.4], [0.0, 0.0]]])
    assert losses.visual_loss(sal, target, "gradia").item() == pytest.approx((0.2 + 0.2 + 0.4 + 0) / 4)
    assert losses.visual_loss(sal, target, "haics").item() == pytest.approx((0.8 * 0.4 + 0.2 * 0.6 + 0.4) / 4)
    # margin: inside (A > 0.5: top-left) only below 0.6 counts, outside only above 0.4
    margin = torch.tensor([[[0.5, 0.45], [0.4, 0.9]]])
    assert losses.visual_loss(margin, target, "margin").item() == pytest.approx((0.1 + 0.05 + 0 + 0.5) / 4)
    assert losses.visual_loss(torch.tensor([[[0.7, 0.3], [0.1, 0.0]]]), target, "margin").item() == 0.0
    point = torch.zeros(1, 5, 5)
    point[0, 2, 2] = 1.0
    blurred_loss = losses.visual_loss(torch.zeros(1, 5, 5), point, "gaussian", gaussian_sigma=1.0).item()
    g = [math.exp(-(d**2) / 2) for d in range(-2, 3)]
    blurred = torch.tensor([[a * b for b in g] for a in g])  # peak-normalised 2-D Gaussian
    assert blurred_loss == pytest.approx(blurred.mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown visual transform"):
        losses.visual_loss(sal, target, "blur")


def test_dc_loss_is_zero_when_saliency_equals_prior_and_positive_otherwise():
    prior = torch.rand(8, 8) + 0.1
    prior = prior / prior.sum()
    sal = (prior / prior.max()).unsqueeze(0)  # same map, normalised to peak 1 as saliency is
    assert losses.distribution_consistency_loss(sal, prior).abs().item() < 1e-6
    other = torch.zeros(1, 8, 8)
    other[0, 0, 0] = 1.0
    assert losses.distribution_consistency_loss(other, prior).item() > 0.1


def test_dc_loss_matches_hand_kl():
    sal = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    prior = torch.full((2, 2), 0.25)
    eps = 1e-6
    p = torch.tensor([1 + eps, eps, eps, 1 + eps]) / (2 + 4 * eps)
    expected = (p * (p / 0.25).log()).sum().item()  # ≈ log 2
    assert losses.distribution_consistency_loss(sal, prior, eps).item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(math.log(2), rel=1e-4)


def test_objective_masks_per_sample_and_combines_weights():
    w = LossConfig(text_weight=0.5, visual_weight=2.0, dc_weight=0.1)
    ce = torch.tensor([1.0, 2.0])
    text = torch.tensor([4.0, 6.0])
    visual = torch.tensor([0.3, 100.0])  # sample 1 has no mask: its L1 must not count
    dc = torch.tensor([50.0, 0.7])  # sample 0 has a mask: its KL must not count
    has_mask = torch.tensor([True, False])
    total = losses.megl_objective(ce, text, visual, dc, has_mask, w)
    expected = ((1 + 0.5 * 4 + 2 * 0.3) + (2 + 0.5 * 6 + 2 * 0.1 * 0.7)) / 2
    assert total.item() == pytest.approx(expected)


def test_samples_without_masks_contribute_no_visual_loss_gradient():
    sal = torch.rand(3, 4, 4, requires_grad=True)
    masks = torch.rand(3, 4, 4)
    has_mask = torch.tensor([True, False, False])
    vis = losses.visual_loss(sal, masks)
    total = losses.megl_objective(torch.zeros(3), None, vis, None, has_mask, LossConfig())
    total.backward()
    assert sal.grad[0].abs().sum() > 0
    assert sal.grad[1:].abs().sum() == 0


def test_objective_sample_weight_drops_padding_rows():
    ce = torch.tensor([1.0, 3.0, 100.0])
    has_mask = torch.zeros(3, dtype=torch.bool)
    w = LossConfig()
    weighted = losses.megl_objective(ce, None, None, None, has_mask, w, torch.tensor([1.0, 1.0, 0.0]))
    assert weighted.item() == pytest.approx(2.0)
    assert losses.megl_objective(ce[:1], None, None, None, has_mask[:1], w, torch.zeros(1)).item() == 0.0


def test_input_gradient_penalty_matches_hand_computation():
    # Two channels, 2×2 pixels; the evidence map is the left column, so only the right column's gradient counts.
    grad = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]], [[0.5, 1.0], [0.0, 2.0]]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    expected = (2.0**2 + 1.0**2) + ((-4.0) ** 2 + 2.0**2)  # Σ over channels and pixels outside the evidence
    assert losses.input_gradient_penalty(grad, target).item() == pytest.approx(expected)
    assert losses.input_gradient_penalty(grad, torch.ones(1, 2, 2)).item() == 0.0  # all evidence: no penalty


def test_input_gradient_penalty_of_a_linear_model_is_its_weight_outside_the_mask():
    # Linear model, logits = W x: ∂/∂x Σ_k log p_k = Σ_k w_k − K·Σ_j p_j w_j (K classes), by hand.
    w = torch.tensor([[0.0, 3.0], [0.0, -3.0]])  # 2 classes; only pixel 1 (outside the mask) drives them apart
    x = torch.tensor([[[[0.0, 0.5]]]], requires_grad=True)
    (g,) = torch.autograd.grad(torch.log_softmax(x.flatten(1) @ w.T, dim=1).sum(), x, create_graph=True)
    p = torch.softmax(torch.tensor([1.5, -1.5]), dim=0)
    grad_pixel1 = (3.0 - 3.0) - 2 * (p[0] * 3.0 + p[1] * -3.0)
    penalty = losses.input_gradient_penalty(g, torch.tensor([[[1.0, 0.0]]]))  # pixel 0 is the evidence
    assert penalty.item() == pytest.approx(grad_pixel1.item() ** 2, rel=1e-6)
    penalty.backward()  # differentiable again (the double backward that trains the model)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_objective_adds_rrr_on_masked_samples_only():
    w = LossConfig(text_weight=0.0, visual_weight=0.0, rrr_weight=10.0)
    ce = torch.tensor([1.0, 2.0])
    rrr = torch.tensor([0.25, 99.0])  # sample 1 has no mask: its penalty must not count
    total = losses.megl_objective(ce, None, None, None, torch.tensor([True, False]), w, rrr=rrr)
    assert total.item() == pytest.approx(((1 + 10 * 0.25) + 2) / 2)


def test_objective_adds_the_counterfactual_ce_of_every_sample():
    w = LossConfig(text_weight=0.0, visual_weight=0.0, counterfactual_weight=0.5)
    ce, cf = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.5])
    total = losses.megl_objective(ce, None, None, None, torch.tensor([True, False]), w, counterfactual=cf)
    assert total.item() == pytest.approx(((1 + 0.5 * 4.0) + (2 + 0.5 * 0.5)) / 2)
    weighted = losses.megl_objective(
        ce, None, None, None, torch.tensor([True, False]), w, sample_weight=torch.tensor([1.0, 0.0]), counterfactual=cf
    )
    assert weighted.item() == pytest.approx(1 + 0.5 * 4.0)  # a padding row's counterfactual does not count


def test_visual_ramp_is_zero_then_linear_then_one():
    # ramp over 30-60 % of 100 steps
    assert [losses.visual_ramp(s, 100, 0.3, 0.6) for s in (0, 29, 30, 45, 59, 60, 99)] == pytest.approx(
        [0.0, 0.0, 0.0, 0.5, 29 / 30, 1.0, 1.0]
    )
    assert losses.visual_ramp(0, 100, 0.0, 0.0) == 1.0  # no ramp: the paper's constant λ_vis from step 0
    assert losses.visual_ramp(49, 100, 0.5, 0.5) == 0.0 and losses.visual_ramp(50, 100, 0.5, 0.5) == 1.0


def test_objective_visual_scale_multiplies_visual_and_dc_terms_only():
    ce, text = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    visual, dc = torch.tensor([0.2, 9.0]), torch.tensor([9.0, 0.4])
    has_mask = torch.tensor([True, False])
    w = LossConfig(text_weight=2.0, visual_weight=3.0, dc_weight=0.5)
    got = losses.megl_objective(ce, text, visual, dc, has_mask, w, visual_scale=0.25)
    # sample 0: 1 + 2·0.5 + 3·0.25·0.2; sample 1: 2 + 2·0.5 + 3·0.25·0.5·0.4
    assert got.item() == pytest.approx(((1 + 1 + 0.15) + (2 + 1 + 0.15)) / 2)


def test_visual_ramp_bounds_are_validated():
    from megl_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="visual_ramp"):
        LossConfig(visual_ramp_start=0.6, visual_ramp_end=0.3)


def test_uniform_kl_is_zero_for_a_uniform_prediction_and_the_kl_otherwise():
    logits = torch.tensor([[3.0, 3.0, 3.0, 3.0], [math.log(0.7), math.log(0.1), math.log(0.1), math.log(0.1)]])
    got = losses.uniform_kl(logits)
    by_hand = sum(0.25 * math.log(0.25 / p) for p in (0.7, 0.1, 0.1, 0.1))  # KL(U‖p)
    assert got[0].item() == pytest.approx(0.0, abs=1e-6) and got[1].item() == pytest.approx(by_hand, rel=1e-5)


def test_objective_adds_the_background_term_with_its_weight():
    w = LossConfig(text_weight=0.0, visual_weight=0.0, counterfactual_weight=0.5, background_weight=2.0)
    ce, cf, bg = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.0]), torch.tensor([0.25, 0.0])
    total = losses.megl_objective(
        ce, None, None, None, torch.tensor([True, False]), w, counterfactual=cf, background=bg
    )
    assert total.item() == pytest.approx(((1 + 0.5 * 4.0 + 2.0 * 0.25) + 2) / 2)

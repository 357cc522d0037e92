import pytest
import torch

from megl_ray.config import load_config, packaged_config
from megl_ray.model import build_megl_model
from tests.support.toy import corpus, make_batch


def _model(*overrides, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(packaged_config("tiny"), list(overrides))
    return cfg, build_megl_model(cfg, num_classes=4, corpus=corpus())


def _conv_grad(model):
    grad = model.classifier.backbone.body[0].weight.grad
    return torch.zeros(()) if grad is None else grad.abs().sum()


def test_text_loss_reaches_classifier_through_saliency_alone_for_a_sample_without_mask():
    # Z_I detached: the only path from L_text to the classifier is Â inside I ⊙ Â (the paper's textual supervision
    # of visual explanations).
    cfg, model = _model("model.detach_classifier_features=true", "loss.visual_weight=0", "loss.text_weight=1")
    torch.nn.init.normal_(model.fusion.proj.weight, std=0.02)  # a live W_I, so only the detach can cut Z_I's path
    batch = make_batch(model, cfg, n=4, mask_every=2)
    batch["has_mask"][:] = False  # no sample has a mask: L_visual cannot be the path
    model.train()
    out = model(**batch)
    assert out.saliency.flatten(1).amax(1).max() > 0  # a live Â (a ReLU-dead map passes no gradient)
    # back-propagate L_text only (not CE) to isolate its path
    out.text.sum().backward()
    assert _conv_grad(model) > 0


def test_text_loss_gradient_to_classifier_is_exactly_zero_without_sdtg():
    cfg, model = _model("model.sdtg=false", "loss.visual_weight=0")
    assert model.fusion is None
    batch = make_batch(model, cfg, n=2)
    model.train()
    out = model(**batch)
    out.text.sum().backward()
    assert _conv_grad(model).item() == 0.0
    assert model.classifier.head.weight.grad is None or model.classifier.head.weight.grad.abs().sum() == 0


def test_with_sdtg_classifier_features_feed_the_text_path():
    cfg, model = _model("loss.visual_weight=0")
    torch.nn.init.normal_(model.fusion.proj.weight, std=0.02)  # zero-initialised: give W_I a value to test Z_I
    batch = make_batch(model, cfg, n=2)
    model.train()
    out = model(**batch)
    out.text.sum().backward()
    assert model.fusion.proj.weight.grad.abs().sum() > 0
    assert _conv_grad(model) > 0


def test_samples_without_masks_contribute_no_visual_loss():
    cfg, model = _model("loss.text_weight=0", "loss.dc_weight=0")
    batch = make_batch(model, cfg, n=4, mask_every=2)  # samples 0, 2 have masks
    model.train()
    base = model(**batch)
    changed = {**batch, "masks": batch["masks"].clone()}
    changed["masks"][1] = 1.0  # garbage in a mask the indicator says is absent
    changed["masks"][3] = torch.rand(64, 64)
    assert model(**changed).loss.item() == pytest.approx(base.loss.item(), abs=0)
    changed["masks"][0] = 1.0 - changed["masks"][0]  # a mask that is present does count
    assert model(**changed).loss.item() != pytest.approx(base.loss.item())


def test_forward_reports_every_term_and_total_matches_equation():
    cfg, model = _model("loss.text_weight=0.5", "loss.visual_weight=2", "loss.dc_weight=0.3")
    batch = make_batch(model, cfg, n=8, mask_every=4)
    model.train()
    out = model(**batch, full_logits=True)
    assert set(out.terms) == {"loss", "ce", "text", "visual", "dc"}
    from megl_ray.model import losses

    ce = losses.classification_loss(out.logits, batch["labels"])
    text = losses.text_loss(out.text_logits, batch["text_labels"])
    vis = losses.visual_loss(out.saliency, batch["masks"])
    dc = losses.distribution_consistency_loss(out.saliency, model.prior)
    hm = batch["has_mask"].float()
    expected = (ce + 0.5 * text + 2 * (hm * vis + (1 - hm) * 0.3 * dc)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_tiny_megl_overfits_sixteen_samples():
    cfg, model = _model("optim.lr=0.003")
    batch = make_batch(model, cfg, n=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr)
    model.train()
    first_text = None
    for _ in range(80):
        out = model(**batch)
        first_text = first_text if first_text is not None else out.terms["text"].item()
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    accuracy = (out.logits.argmax(1) == batch["labels"]).float().mean().item()
    assert accuracy == 1.0
    assert out.terms["text"].item() <= 0.5 * first_text
    rationales = model.generate(
        batch["pixels"][:4], ["top left", "top right", "bottom left", "bottom right"], max_new_tokens=12
    )
    assert len(rationales) == 4 and all(isinstance(r, str) for r in rationales)


# Pinned with torch 2.14 on CPU: the first SGD steps of the tiny model from seed 0. A change here means the model,
# the loss or the data path changed behaviour: update only on purpose.
GOLDEN_LOSSES = [  # recomputed for λ_vis = 10 (issue 11; step 0 = the old 7.36133 + 9 × its visual part 0.05362)
    {"loss": 7.84392, "ce": 1.39218, "text": 5.91553, "visual": 0.17818, "dc": 1.21003},
    {"loss": 7.36767, "ce": 1.39553, "text": 5.72788, "visual": 0.06751, "dc": 1.00673},
    {"loss": 7.12825, "ce": 1.39338, "text": 5.52227, "visual": 0.06251, "dc": 0.75120},
]


def test_golden_losses_of_first_steps():
    cfg, model = _model()
    batch = make_batch(model, cfg, n=8)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    seen = []
    for _ in range(3):
        out = model(**batch)
        seen.append({k: v.item() for k, v in out.terms.items()})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert len(seen) == len(GOLDEN_LOSSES)
    for step, (got, want) in enumerate(zip(seen, GOLDEN_LOSSES)):
        assert set(got) == set(want), step
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (step, key)


def test_rrr_option_adds_the_input_gradient_penalty_of_masked_samples():
    cfg, model = _model("loss.rrr_weight=100", "loss.text_weight=0")
    batch = make_batch(model, cfg, n=4, mask_every=2)  # samples 0 and 2 have a mask
    model.train()
    out = model(**batch)
    assert "rrr" in out.terms and out.terms["rrr"].item() > 0
    # By hand: the input gradient of Σ_k log p_k of the masked samples, penalised outside their masks.
    pixels = batch["pixels"].clone().requires_grad_(True)
    logits = model.classifier(pixels).logits
    score = (torch.log_softmax(logits, 1).sum(1) * batch["has_mask"]).sum()
    (grad,) = torch.autograd.grad(score, pixels)
    outside = 1 - torch.nn.functional.interpolate(
        batch["masks"].unsqueeze(1), size=pixels.shape[-2:], mode="bilinear", align_corners=False
    )
    rrr = (outside * grad).pow(2).flatten(1).sum(1)
    assert out.terms["rrr"].item() == pytest.approx(rrr[batch["has_mask"]].mean().item(), rel=1e-4)
    without = model.loss_cfg.rrr_weight
    model.loss_cfg.rrr_weight = 0.0
    base = model(**batch).loss.item()
    model.loss_cfg.rrr_weight = without
    assert out.loss.item() == pytest.approx(base + 100 * rrr[batch["has_mask"]].sum().item() / 4, rel=1e-4)
    out.loss.backward()  # the double backward reaches the classifier
    assert _conv_grad(model) > 0


def test_visual_scale_weighs_the_visual_terms_but_they_are_still_reported():
    # the ramp of loss.visual_ramp_start/end: at scale 0 the loss is CE + λ_text·L_text, yet L_visual and L_dc are
    # logged (their curves start at step 1); at 0.5 half of λ_vis·[...] is added
    cfg, model = _model("loss.text_weight=0.5", "loss.visual_weight=2", "loss.dc_weight=0.3")
    batch = make_batch(model, cfg, n=8, mask_every=4)
    model.train()
    torch.manual_seed(0)
    full = model(**batch)
    torch.manual_seed(0)
    off = model(**batch, visual_scale=0.0)
    torch.manual_seed(0)
    half = model(**batch, visual_scale=0.5)
    assert set(off.terms) == {"loss", "ce", "text", "visual", "dc"}
    assert off.loss.item() == pytest.approx((off.terms["ce"] + 0.5 * off.terms["text"]).item(), rel=1e-5)
    assert half.loss.item() == pytest.approx((off.loss + 0.5 * (full.loss - off.loss)).item(), rel=1e-5)

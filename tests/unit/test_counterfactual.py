"""Counterfactual backgrounds (loss.counterfactual_weight), by hand on 4×4 images."""

import torch

from megl_ray.config import load_config
from megl_ray.model.counterfactual import counterfactual_images, explained_region


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


def test_the_region_is_kept_and_the_rest_is_the_next_images_background_with_its_object_blanked():
    a = torch.full((1, 3, 2, 2), 0.1)
    b = torch.tensor([[[[0.2, 0.4], [0.6, 0.9]]]]).expand(1, 3, 2, 2)
    pixels = torch.cat([a, b])
    region = torch.zeros(2, 1, 2, 2)
    region[0, 0, 0, 0] = 1.0  # a keeps its top-left pixel
    region[1, 0, 1, 1] = 1.0  # b's object is its bottom-right pixel (0.9)
    cf = counterfactual_images(pixels, region)
    # a's donor is b (roll by one): b's object pixel becomes the mean of b's background (0.2 + 0.4 + 0.6) / 3
    assert torch.allclose(cf[0, 0], torch.tensor([[0.1, 0.4], [0.6, 0.4]]))
    # b's donor is a: b keeps its object pixel, the rest is a's background; a's object is filled with 0.1
    assert torch.allclose(cf[1, 0], torch.tensor([[0.1, 0.1], [0.1, 0.9]]))
    assert torch.equal(counterfactual_images(pixels[:1], region[:1]), pixels[:1])  # nobody to swap with


def test_the_model_adds_the_term_only_while_training():
    from megl_ray.model import build_megl_model

    cfg = load_config(None, ["loss.counterfactual_weight=1.0", "loss.text_weight=0", "model.image_size=64"])
    torch.manual_seed(0)
    model = build_megl_model(cfg, 3, corpus=["a b c", "one two three"])
    pixels, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    out = model(pixels, labels)
    assert "cf" in out.terms and out.terms["cf"] > 0
    assert out.loss.item() > out.terms["ce"].item()
    out.loss.backward()
    assert model.classifier.head.weight.grad.abs().sum() > 0
    model.eval()
    assert "cf" not in model(pixels, labels).terms

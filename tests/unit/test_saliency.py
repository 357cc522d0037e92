import pytest
import torch

from megl_ray.model.classifier import build_classifier
from megl_ray.model.saliency import (
    autograd_gradcam,
    closed_form_cam,
    gradcam,
    normalize_per_sample,
    per_image_gradcam,
    resize_map,
    upsample,
)


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name, size", [("tiny", 64), ("resnet18", 64), ("vit_b_16", 32)])
def test_closed_form_cam_equals_autograd_gradcam_in_float64(name, size):
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=5, image_size=size).double().eval()
    pixels = torch.rand(3, 3, size, size, dtype=torch.float64)
    target = torch.tensor([0, 3, 4])
    out = model(pixels)
    assert model.cam_weight is not None
    closed = closed_form_cam(out.features, model.cam_weight, target)
    auto = autograd_gradcam(out.features, out.logits, target, create_graph=False)
    assert closed.shape == out.features.shape[:1] + out.features.shape[2:]
    assert closed.abs().max() > 0
    assert _relative_error(closed, auto) < 1e-5


def test_saliency_is_normalised_per_sample_and_differentiable_wrt_parameters():
    torch.manual_seed(0)
    model = build_classifier("tiny", num_classes=4)
    out = model(torch.rand(4, 3, 64, 64))
    sal = gradcam(out.features, out.logits, torch.tensor([0, 1, 2, 3]), model.cam_weight)
    peaks = sal.flatten(1).amax(1)
    assert sal.min() >= 0
    # every map peaks at exactly 1, unless the ReLU left it all zero (possible at random init)
    assert all(abs(p - 1) < 1e-6 or p == 0 for p in peaks.tolist()) and peaks.max() == 1
    sal.sum().backward()
    conv = model.backbone.body[0].weight
    assert conv.grad is not None and conv.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [{"head": "mlp"}, {"vit_pool": "cls"}])
def test_heads_without_closed_form_use_autograd_and_stay_differentiable(kwargs):
    torch.manual_seed(0)
    name, size = ("vit_b_16", 32) if "vit_pool" in kwargs else ("tiny", 64)
    model = build_classifier(name, num_classes=3, image_size=size, **kwargs)
    assert model.cam_weight is None
    out = model(torch.rand(2, 3, size, size))
    sal = gradcam(out.features, out.logits, torch.tensor([0, 2]), model.cam_weight, create_graph=True)
    assert sal.abs().sum() > 0
    sal.sum().backward()  # a double backward reaches the parameters
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_per_image_loop_matches_batched_saliency():
    torch.manual_seed(0)
    model = build_classifier("tiny", num_classes=4).double()
    pixels = torch.rand(3, 3, 64, 64, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])

    def forward(x):
        out = model(x)
        return out.logits, out.features

    looped = per_image_gradcam(forward, pixels, target)
    out = model(pixels)
    assert _relative_error(looped, closed_form_cam(out.features, model.cam_weight, target)) < 1e-5


def test_normalize_keeps_zero_maps_finite():
    maps = torch.zeros(2, 4, 4)
    maps[1, 0, 0] = 3.0
    out = normalize_per_sample(maps)
    assert torch.isfinite(out).all() and out[0].sum() == 0 and out[1, 0, 0] == 1


def test_resize_and_upsample_shapes():
    maps = torch.rand(2, 64, 64)
    small = resize_map(maps, (8, 8))
    assert small.shape == (2, 8, 8)
    assert torch.allclose(small[0, 0, 0], maps[0, :8, :8].mean())
    assert resize_map(torch.rand(16, 16), (8, 8)).shape == (8, 8)
    assert upsample(small, 64).shape == (2, 1, 64, 64)

import pytest
import torch
from safetensors.torch import save_file

from megl_ray.errors import UserError
from megl_ray.model.classifier import build_classifier
from megl_ray.model.saliency import closed_form_cam


@pytest.mark.parametrize(
    "name, size, grid, channels",
    [("tiny", 64, 16, 64), ("resnet18", 64, 2, 512), ("resnet50", 64, 2, 2048), ("vit_b_16", 32, 2, 768)],
)
def test_backbones_give_logits_and_a_feature_map(name, size, grid, channels):
    model = build_classifier(name, num_classes=7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, size, size))
    assert out.logits.shape == (2, 7)
    assert out.features.shape == (2, channels, grid, grid)
    assert model.cam_weight.shape == (7, channels)
    # the head classifies the very map Grad-CAM uses (closed form depends on it)
    logits, cam = model.classify(out.features, torch.tensor([0, 6]))
    assert torch.allclose(logits, out.logits, atol=1e-5)
    assert torch.allclose(cam, closed_form_cam(out.features, model.cam_weight, torch.tensor([0, 6])))
    assert model(torch.rand(1, 3, size, size), cam_target="prediction").cam.shape == (1, grid, grid)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_load_from_a_state_dict_file_except_the_head(tmp_path, suffix):
    torch.manual_seed(0)
    source = build_classifier("tiny", num_classes=10)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    torch.manual_seed(1)
    loaded = build_classifier("tiny", num_classes=3, weights=str(path))  # another head size: head stays new
    assert torch.equal(loaded.backbone.body[0].weight, source.backbone.body[0].weight)
    assert loaded.head.weight.shape == (3, 64)


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not a torchvision weights name"):
        build_classifier("resnet18", 3, weights="IMAGENET_NOPE")
    with pytest.raises(UserError, match="weights file not found"):
        build_classifier("tiny", 3, weights=str(tmp_path / "missing.pt"))
    pickled = tmp_path / "obj.pt"
    torch.save({"model": object()}, pickled)  # arbitrary objects are never unpickled
    with pytest.raises(UserError, match="not a weights-only"):
        build_classifier("tiny", 3, weights=str(pickled))
    other = tmp_path / "other.pt"
    torch.save(build_classifier("resnet18", 3).state_dict(), other)
    with pytest.raises(UserError, match="does not fit this classifier"):
        build_classifier("tiny", 3, weights=str(other))
    with pytest.raises(UserError, match="unknown classifier"):
        build_classifier("alexnet", 3)

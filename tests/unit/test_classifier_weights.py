"""``model.classifier_weights`` in torchvision's layout (ResNet, ViT) loads into the project's classifier, and a
torchvision weights enum that cannot be downloaded (offline) is one line naming the file to place, before anything
starts. No test reaches a download server: the offline case replaces torchvision's downloader."""

from __future__ import annotations

import json
import math
import urllib.error

import pytest
import torch
import torchvision
from safetensors.torch import load_file

from megl_ray import train as train_command
from megl_ray.cli import run_cli
from megl_ray.config import load_config, packaged_config
from megl_ray.errors import UserError
from megl_ray.model.classifier import build_classifier
from megl_ray.model.export_io import load_export
from megl_ray.model.vlm import check_model_sources
from megl_ray.training.local import train


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=7).eval()
    path = tmp_path_factory.mktemp("tv") / "resnet18.pt"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_a_torchvision_resnet_state_dict_loads_and_gives_its_feature_map(resnet_file):
    reference, path = resnet_file
    model = build_classifier("resnet18", 4, weights=str(path)).eval()
    assert torch.equal(model.backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(model.backbone.stages[3][1].bn2.running_var, reference.layer4[1].bn2.running_var)
    pixels = torch.rand(2, 3, 64, 64)
    normalised = (pixels - model.mean) / model.std
    trunk = torch.nn.Sequential(*list(reference.children())[:-2])  # torchvision's ResNet up to layer4
    with torch.no_grad():
        assert torch.allclose(model.feature_map(pixels), trunk(normalised), atol=1e-6)


def test_a_torchvision_vit_state_dict_loads(tmp_path):
    torch.manual_seed(4)
    reference = torchvision.models.vit_b_16(image_size=32, num_classes=5)
    torch.save(reference.state_dict(), tmp_path / "vit.pt")
    model = build_classifier("vit_b_16", 3, image_size=32, weights=str(tmp_path / "vit.pt"))
    assert torch.equal(model.backbone.vit.conv_proj.weight, reference.conv_proj.weight)
    assert torch.equal(model.backbone.vit.encoder.pos_embedding, reference.encoder.pos_embedding)


def test_a_state_dict_of_another_model_is_one_line(tmp_path):
    torch.save(torchvision.models.resnet50(num_classes=2).state_dict(), tmp_path / "r50.pt")
    with pytest.raises(Exception, match="does not fit this classifier"):
        build_classifier("resnet18", 4, weights=str(tmp_path / "r50.pt"))


def test_torchvision_layout_weights_train_in_the_one_process_trainer(resnet_file, data_uri):
    _, path = resnet_file
    cfg = load_config(
        packaged_config("tiny"),
        ["model.classifier=resnet18", f"model.classifier_weights={path}", f"data.uri={data_uri}"],
    )
    result = train(cfg, max_steps=2)
    assert result["steps"] == 2 and math.isfinite(result["final"]["loss"])


def test_an_enum_offline_is_one_line_naming_the_file_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MEGL_HOME", str(tmp_path / "home"))

    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    cfg = load_config(packaged_config("tiny"), ["model.classifier=resnet18", "model.classifier_weights=IMAGENET1K_V1"])
    with pytest.raises(UserError, match=r"place resnet18-f37072fd\.pth .* in .*torch/hub/checkpoints"):
        check_model_sources(cfg.model)
    argv = ["model.classifier=resnet18", "model.classifier_weights=IMAGENET1K_V1"]
    assert run_cli("megl_ray.train", train_command.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "home").exists()  # nothing started
    # a file already in the cache is used as it is: no download attempted
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"")
    check_model_sources(cfg.model)


def test_the_export_holds_the_resnet_classifier_in_torchvision_layout_with_identical_logits(data_uri, tmp_path):
    cfg = load_config(packaged_config("tiny"), ["model.classifier=resnet18", f"data.uri={data_uri}"])
    train(cfg, max_steps=2, export=str(tmp_path / "export"))
    folder = tmp_path / "export" / "classifier"
    config = json.loads((folder / "config.json").read_text())
    assert config["builder"] == "torchvision.models.resnet18" and config["num_classes"] == len(config["classes"])
    tv = torchvision.models.resnet18(num_classes=config["num_classes"])
    tv.load_state_dict(load_file(str(folder / "model.safetensors")))  # strict: no missing or unexpected key
    tv.eval()
    ours = load_export(str(tmp_path / "export")).model.classifier.eval()
    pixels = torch.rand(3, 3, config["image_size"], config["image_size"])
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(tv((pixels - mean) / std), ours(pixels).logits, atol=1e-5)

"""Classifier weights in the conventions researchers hold them: torchvision's own state-dict layout (what
``torchvision.models.resnet18().state_dict()`` or a fine-tune of it saves), the project's layout (what a megl_ray
classifier saves), and torchvision's weights enums (``IMAGENET1K_V1``), checked where the run starts.

Layouts: a torchvision ResNet's ``conv1``/``bn1``/``layer1..4``/``fc`` are our ``backbone.stem.0``/``backbone.stem.1``/
``backbone.stages.0..3``/``head``; a torchvision ViT's keys are ours under ``backbone.vit.``.
"""

from __future__ import annotations

import os

import torch
from torchvision.models import get_model_weights

from megl_ray.errors import UserError

_RESNET = {"conv1.": "backbone.stem.0.", "bn1.": "backbone.stem.1.", "fc.": "head."}


def from_torchvision_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` in the project's layout: a torchvision ResNet or ViT state dict renamed, anything else unchanged."""
    if "conv1.weight" in state:  # torchvision ResNet
        renamed = {}
        for key, value in state.items():
            prefix = next((p for p in _RESNET if key.startswith(p)), None)
            if prefix is not None:
                renamed[_RESNET[prefix] + key[len(prefix) :]] = value
            elif key.startswith("layer") and key[5:6].isdigit():
                renamed[f"backbone.stages.{int(key[5]) - 1}." + key.split(".", 1)[1]] = value
            else:
                renamed[key] = value  # reported as unexpected by the strict load
        return renamed
    if "class_token" in state and "conv_proj.weight" in state:  # torchvision ViT
        return {f"backbone.vit.{key}": value for key, value in state.items()}
    return state


def check_torchvision_weights(builder: str, weights: str | None) -> None:
    """Fail in one line, before anything starts, when ``weights`` names a torchvision enum whose file is neither in
    the torch hub cache nor downloadable here (offline): say which file to place where."""
    if builder == "tiny" or not weights or "/" in weights or weights.endswith((".pt", ".pth", ".safetensors")):
        return
    enum = get_model_weights(builder)
    if weights not in {w.name for w in enum} and weights != "DEFAULT":
        return  # the builder's own check names the valid values
    chosen = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    if os.path.isfile(os.path.join(cache, os.path.basename(chosen.url))):
        return
    try:
        torch.hub.load_state_dict_from_url(chosen.url, model_dir=cache, progress=False, map_location="cpu")
    except OSError as err:  # URLError and friends: offline, a proxy, a firewall
        raise UserError(
            f"model.classifier_weights={weights}: torchvision's {chosen} could not be downloaded ({err}): place "
            f"{os.path.basename(chosen.url)} (from {chosen.url}) in {cache} (TORCH_HOME), or give a .pt/.safetensors"
        ) from None


def to_torchvision_layout(state: dict[str, torch.Tensor], classifier: str) -> dict[str, torch.Tensor]:
    """A ResNet classifier's state (the project's layout, keys without the ``classifier.`` prefix) in torchvision's:
    what ``torchvision.models.<classifier>(num_classes=N).load_state_dict`` takes. Only ResNets with the linear head:
    their CAM head on the feature map is exactly torchvision's avgpool + fc."""
    if not classifier.startswith("resnet"):
        raise ValueError(f"{classifier}: only ResNet classifiers have a torchvision layout here")
    inverse = {v: k for k, v in _RESNET.items()}
    out = {}
    for key, value in state.items():
        prefix = next((p for p in inverse if key.startswith(p)), None)
        if prefix is not None:
            out[inverse[prefix] + key[len(prefix) :]] = value
        elif key.startswith("backbone.stages."):
            stage, rest = key[len("backbone.stages.") :].split(".", 1)
            out[f"layer{int(stage) + 1}.{rest}"] = value
        else:
            raise ValueError(f"{key}: not a ResNet classifier tensor")
    return out

"""What each consumer sees: images decoded once at the larger of the classifier's and the vision tower's sides and
resized down per consumer, and LLaVA-1.5's pad-to-square (``model.image_aspect=pad``) next to the default squash."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megl_ray.config import load_config, packaged_config
from megl_ray.data.transforms import PAD_RGB, decode_image, pad_mask, preprocess_rows
from megl_ray.errors import ConfigError, UserError
from megl_ray.model import build_megl_model
from megl_ray.model.classifier import fit_pixels
from megl_ray.model.saliency import upsample
from megl_ray.model.vlm import CLIP_MEAN, CLIP_STD, pixel_size, train_tokenizer
from tests.support.toy import corpus, make_batch

RED = (200, 30, 10)


def _png(width: int, height: int, color=RED) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _rgb(pixels: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.rint(pixels[:, row, col] * 255.0))


def test_pad_colour_is_llava_expand2square_background():
    assert PAD_RGB == tuple(int(x * 255) for x in CLIP_MEAN)  # LLaVA: tuple(int(x*255) for x in image_mean)


def test_pad_pads_a_wide_and_a_tall_image_instead_of_stretching_them():
    wide = decode_image(_png(40, 20), 40, "pad")  # canvas 40x40: no resize, exact values
    assert wide.shape == (3, 40, 40)
    assert {_rgb(wide, r, c) for r in range(10) for c in range(40)} == {PAD_RGB}  # top band
    assert {_rgb(wide, r, c) for r in range(30, 40) for c in range(40)} == {PAD_RGB}  # bottom band
    assert {_rgb(wide, r, c) for r in range(10, 30) for c in range(40)} == {RED}  # the image, unstretched
    tall = decode_image(_png(20, 40), 40, "pad")
    assert {_rgb(tall, r, c) for r in range(40) for c in list(range(10)) + list(range(30, 40))} == {PAD_RGB}
    assert {_rgb(tall, r, c) for r in range(40) for c in range(10, 30)} == {RED}
    squashed = decode_image(_png(40, 20), 40)  # the default stretches: no background anywhere
    assert {_rgb(squashed, r, c) for r in range(40) for c in range(40)} == {RED}
    small = decode_image(_png(40, 20), 8, "pad")  # resized after padding: bands of 2 rows at side 8
    assert _rgb(small, 0, 4) == PAD_RGB and _rgb(small, 4, 4) == RED and _rgb(small, 7, 4) == PAD_RGB
    square = _png(16, 16)
    assert np.array_equal(decode_image(square, 8, "pad"), decode_image(square, 8, "squash"))


def test_pad_moves_the_mask_into_the_padded_frame():
    full = np.full((8, 8), 255, dtype=np.uint8)  # a mask over a whole 40x20 image, stored squashed at 8x8
    padded = pad_mask(full, 40, 20)
    assert (padded[:2] == 0).all() and (padded[6:] == 0).all() and (padded[2:6] == 255).all()
    tall = pad_mask(full, 20, 40)
    assert (tall[:, :2] == 0).all() and (tall[:, 6:] == 0).all() and (tall[:, 2:6] == 255).all()
    assert np.array_equal(pad_mask(full, 30, 30), full)


def test_preprocess_rows_pads_images_and_masks_alike():
    tok = train_tokenizer(corpus(), 300)
    rows = {
        "id": ["a"],
        "image": [_png(40, 20)],
        "class_id": [0],
        "class_name": ["top left"],
        "has_mask": [True],
        "mask": [bytes([255] * 64)],
        "rationales": [["a bright square"]],
    }
    pre = preprocess_rows(rows, tok, image_size=40, mask_size=8, max_rationales=1, max_text_tokens=8, aspect="pad")
    pixels = pre["pixels"][0].astype(np.float32) / 255.0
    assert _rgb(pixels, 0, 0) == PAD_RGB and _rgb(pixels, 20, 20) == RED
    assert (pre["mask"][0][:2] == 0).all() and (pre["mask"][0][2:6] == 255).all()
    squash = preprocess_rows(rows, tok, image_size=40, mask_size=8, max_rationales=1, max_text_tokens=8)
    assert (squash["mask"][0] == 255).all() and _rgb(squash["pixels"][0] / 255.0, 0, 0) == RED
    with pytest.raises(ConfigError, match="model.image_aspect"):
        load_config(packaged_config("tiny"), ["model.image_aspect=crop"])


def test_decode_side_is_the_larger_of_the_classifier_and_the_vision_tower(tmp_path):
    tiny = load_config(packaged_config("tiny"))
    assert pixel_size(tiny.model) == tiny.model.image_size == 64  # the default path: decoded as before
    assert pixel_size(load_config(packaged_config("tiny"), ["model.image_size=16"]).model) == 32
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"vision_config": {"image_size": 336, "patch_size": 14}}))
    cfg = load_config(None, ["model.preset=llava", f"model.vlm_path={llava}", "model.image_size=224"])
    assert pixel_size(cfg.model) == 336
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"image_size": 336}))  # a CLIPVisionConfig: not nested
    cfg = load_config(
        None,
        [
            "model.preset=clip-qwen2",
            f"model.vision_path={clip}",
            f"model.lm_path={clip}",
            "model.image_size=448",
            "model.classifier=resnet18",
        ],
    )
    assert pixel_size(cfg.model) == 448
    cfg = load_config(None, ["model.preset=llava", f"model.vlm_path={tmp_path}"])
    with pytest.raises(UserError, match="model.vlm_path"):
        pixel_size(cfg.model)


def _seen_sizes(model, batch):
    seen = {}

    def keep(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, (args[0] if args else kwargs["pixel_values"]).clone())

        return hook

    model.classifier.register_forward_pre_hook(keep("classifier"), with_kwargs=True)
    model.vlm.model.vision_tower.register_forward_pre_hook(keep("tower"), with_kwargs=True)
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    return seen, out


@pytest.mark.parametrize("classifier_side, tower_side", [(32, 64), (64, 32)])
def test_the_classifier_and_the_vlm_each_get_their_own_side(classifier_side, tower_side):
    torch.manual_seed(0)
    cfg = load_config(
        packaged_config("tiny"), [f"model.image_size={classifier_side}", f"model.tiny_vision_image_size={tower_side}"]
    )
    model = build_megl_model(cfg, num_classes=4, corpus=corpus())
    assert model.pixel_size == pixel_size(cfg.model) == 64
    batch = make_batch(model, cfg, n=2)  # toy pixels are 64x64: decoded at the pixel size
    seen, out = _seen_sizes(model, batch)
    pixels = batch["pixels"]
    assert torch.equal(seen["classifier"], fit_pixels(pixels, classifier_side))
    assert seen["tower"].shape[-1] == tower_side
    # I ⊙ Â at the decoded side (Â upsampled to it), resized down to the tower only when the tower is smaller:
    # never an upsampled image
    product = pixels * upsample(out.saliency, (64, 64))
    expected = fit_pixels(product, tower_side)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["tower"], (expected - mean) / std)

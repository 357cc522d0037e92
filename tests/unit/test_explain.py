"""``python -m megl_ray.explain``: one clear line for a file that is not an image; heat on the object for a model
trained with masks (a synthetic dataset whose masks are known exactly); a gallery whose every image loads in
Chromium."""

import json

import numpy as np
from PIL import Image

from megl_ray.cli import run_cli
from megl_ray.data.reader import read_split
from megl_ray.explain import main
from tests.support.squares import CLASSES, SIDE, SIZE


def test_missing_image_and_missing_arguments_are_one_line(tmp_path, capsys):
    for argv, message in [
        ([str(tmp_path / "nope.png")], "no such file"),
        ([], "give at least one IMAGE"),
        (["--gallery"], "--gallery needs --data"),
    ]:
        code = run_cli(
            "python -m megl_ray.explain", main, ["--checkpoint", str(tmp_path), *argv, "--out", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_heat_is_on_the_object_for_a_model_trained_with_masks(squares, tmp_path):
    src, data, export = squares
    ids = read_split(data, "test").column("id").to_pylist()
    images = [str(src / "images" / f"{i}.png") for i in ids]
    out = tmp_path / "out"
    result = main(["--checkpoint", export, *images, "--out", str(out), "--top-k", "2", "--max-new-tokens", "12"])
    assert json.loads((out / "explanations.json").read_text()) == result
    share = SIDE * SIDE / (SIZE * SIZE)  # the object's share of the image area
    fractions = []
    for record, sample_id in zip(result["explanations"], ids):
        assert record["predicted"] in CLASSES and len(record["top_k"]) == 2 and isinstance(record["rationale"], str)
        assert record["top_k"][0]["probability"] >= record["top_k"][1]["probability"]
        mask = np.load(src / "masks" / f"{sample_id}.npy") >= 0.5
        heat = np.asarray(Image.open(out / record["saliency"]), dtype=np.float64)
        assert heat.shape == mask.shape
        fractions.append(heat[mask].sum() / max(heat.sum(), 1e-9))
        # the overlay itself: 'jet' is red where hot and blue where cold, so red minus blue is higher on the object
        overlay = np.asarray(Image.open(out / record["overlay"]).convert("RGB"), dtype=np.float64)
        warmth = overlay[..., 0] - overlay[..., 2]
        assert overlay.shape[:2] == mask.shape and warmth[mask].mean() > warmth[~mask].mean()
    fractions = np.asarray(fractions)
    # a uniform map would put `share` of its mass on the object; a model trained with masks puts many times more
    assert np.median(fractions) > 5 * share, fractions
    assert (fractions > 3 * share).mean() >= 0.8, fractions


# Counts the page's images that decoded (complete and with a width) into the DOM, for --dump-dom to read back.

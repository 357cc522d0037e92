"""megl_ray.reporting.pictures: curves.png from a run's history, and the closing lines that name the pictures."""

from __future__ import annotations

import numpy as np
from PIL import Image

from megl_ray.reporting.pictures import closing_lines, draw_curves


def test_curves_png_has_both_panels_from_a_history(tmp_path):
    history = [
        {"kind": "step", "step": s, "values": {"loss": 9.0 / s, "ce": 2.0 / s, "text": 5.0, "dc": 0.5}}
        for s in (3, 6, 9)
    ]
    history += [
        {"kind": "epoch", "step": 9 * e, "epoch": e, "values": {"val_accuracy": 0.1 * e, "val_miou": float("nan")}}
        for e in (1, 2)
    ]
    path = draw_curves(history, tmp_path / "curves.png", "run t")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 400)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    # matplotlib's first two line colours (loss: C0 blue, ce: C1 orange) are drawn somewhere
    colours = set(map(tuple, pixels.tolist()))
    assert (31, 119, 180) in colours and (255, 127, 14) in colours
    assert draw_curves([], tmp_path / "empty.png", "none") is None


def test_closing_lines_name_the_pictures_and_the_commands_to_open_them():
    made = {"curves": "/h/runs/r/curves.png", "gallery": "/h/runs/r/gallery/index.html"}
    lines = closing_lines(made, "s3://b/runs/r", "/h/runs/r/tensorboard")
    assert len(lines) == 3
    assert "/h/runs/r/curves.png" in lines[0] and "s3://b/runs/r/curves.png" in lines[0]
    assert "python -m webbrowser file:///h/runs/r/gallery/index.html" in lines[1]
    assert lines[2].endswith("tensorboard --logdir /h/runs/r/tensorboard")
    assert closing_lines({}, "s3://b/runs/r", None) == []

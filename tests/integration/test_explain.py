"""``python -m megl_ray.explain``: one clear line for a file that is not an image; heat on the object for a model
trained with masks (a synthetic dataset whose masks are known exactly); a gallery whose every image loads in
Chromium."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megl_ray.explain import main
from tests.support.chromium import CHECK_SCRIPT, find_chromium, loaded_images
from tests.support.squares import CLASSES

ROOT = Path(__file__).resolve().parents[2]


def test_a_file_that_is_not_an_image_gives_one_clear_line(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_text("this is text, not a PNG")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # the image is checked before the checkpoint is loaded, so a missing checkpoint does not mask the problem
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megl_ray.explain",
            "--checkpoint",
            str(tmp_path / "none"),
            str(bad),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"python -m megl_ray.explain: error: {bad}: not a usable image: file is not an image format that can be read"
    ]


def test_gallery_renders_in_headless_chromium_with_every_image(squares, tmp_path):
    src, data, export = squares
    out = tmp_path / "gallery"
    result = main(
        [
            "--checkpoint",
            export,
            "--gallery",
            "--data",
            data,
            "--split",
            "test",
            "--per-class",
            "2",
            "--out",
            str(out),
            "--max-new-tokens",
            "12",
        ]
    )
    assert result["gallery"]["examples"] == 2 * len(CLASSES)
    page = (out / "index.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    # image, overlay, Â region and mask for each (every square has a mask)
    assert len(sources) == 4 * 2 * len(CLASSES)
    assert all("/" not in s and (out / s).is_file() for s in sources)  # relative, next to the page
    records = result["gallery"]["records"]
    assert len(records) == 2 * len(CLASSES) and page.count("IoU <b>") == len(records)
    for ex in records:
        # the IoU shown is that of the two pictured regions (both drawn at the image's size from the mask grid)
        region = np.asarray(Image.open(out / ex["region"])) >= 128
        mask = np.asarray(Image.open(out / ex["mask"])) >= 128
        assert region.shape == mask.shape and ex["iou"] is not None
        assert ex["iou"] == pytest.approx((region & mask).sum() / (region | mask).sum(), abs=1e-6)
        assert f"{ex['iou']:.2f}" in page and ex["references"] and isinstance(ex["rationale"], str)
    # a map spread over the whole image would score the square's share of the area (1/16); this one overlaps more
    assert np.mean([ex["iou"] for ex in records]) > 0.1
    for cls in CLASSES:
        assert f"<h2>{cls}</h2>" in page
    assert "Generated:" in page and "References:" in page and "coloured patch" in page

    chromium = find_chromium()
    if chromium is None:
        pytest.skip(
            "Debian chromium is not installed and could not be installed with apt-get (.ci/run should "
            "install it: apt-get install -y chromium)"
        )
    check = out / "check.html"
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    assert loaded_images(chromium, check, tmp_path / "profile") == (len(sources), len(sources))
    # the check can fail: a page with a missing image is caught
    check.write_text(page.replace("</body>", '<img src="missing.png">' + CHECK_SCRIPT + "</body>"))
    assert loaded_images(chromium, check, tmp_path / "profile") == (len(sources), len(sources) + 1)

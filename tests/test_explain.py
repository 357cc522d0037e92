"""``python -m megl_ray.explain``: one clear line for a file that is not an image; heat on the object for a model
trained with masks (a synthetic dataset whose masks are known exactly); a gallery whose every image loads in
Chromium."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megl_ray import train_local
from megl_ray.cli import run_cli
from megl_ray.data import convert
from megl_ray.data.reader import read_split
from megl_ray.explain import main
from tests.squares import CLASSES, SIDE, SIZE, write_squares

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """(source folder, converted dataset, export of a tiny MEGL trained on it with a strong visual loss)."""
    root = tmp_path_factory.mktemp("squares")
    src = write_squares(root / "src")
    data = str(root / "data")
    convert.main([str(src), data])
    export = str(root / "export")
    result = train_local.main(
        ["--export", export, f"data.uri={data}", "train.epochs=12", "loss.visual_weight=10", "loss.text_weight=0.2"]
    )
    assert result["val_accuracy"] >= 0.75, result  # the heat test below is only meaningful for a working model
    return src, data, export


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


def _chromium() -> str | None:
    """Debian's chromium; installed with apt-get when missing and this session may (root, apt-get present)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found or os.environ.get("MEGL_TEST_INSTALL_CHROMIUM", "1") == "0":
        return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            try:
                subprocess.run(cmd, capture_output=True, env=env, timeout=300, check=True)
            except (subprocess.SubprocessError, OSError):
                return None
    return shutil.which("chromium")


# Counts the page's images that decoded (complete and with a width) into the DOM, for --dump-dom to read back.
_CHECK = (
    '<script>window.addEventListener("load", () => {const all = [...document.images];'
    "const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
    'const p = document.createElement("pre"); p.id = "img-check";'
    'p.textContent = "loaded=" + ok + " total=" + all.length; document.body.appendChild(p);});</script>'
)


def _loaded_images(chromium: str, page: Path, profile: Path) -> tuple[int, int]:
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    found = re.search(r"loaded=(\d+) total=(\d+)", proc.stdout)
    assert found, (proc.stdout[-1000:], proc.stderr[-1000:])
    return int(found.group(1)), int(found.group(2))


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

    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "Debian chromium is not installed and could not be installed with apt-get (.ci/run should "
            "install it: apt-get install -y chromium)"
        )
    check = out / "check.html"
    check.write_text(page.replace("</body>", _CHECK + "</body>"))
    assert _loaded_images(chromium, check, tmp_path / "profile") == (len(sources), len(sources))
    # the check can fail: a page with a missing image is caught
    check.write_text(page.replace("</body>", '<img src="missing.png">' + _CHECK + "</body>"))
    assert _loaded_images(chromium, check, tmp_path / "profile") == (len(sources), len(sources) + 1)

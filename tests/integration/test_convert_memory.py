"""``convert`` streams: a 5,000-image manifest whose images decode to ~3.9 GB converts in a process whose address
space is capped far below that (``resource.setrlimit(RLIMIT_AS)``), holding one image at a time."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
IMAGES, SIDE = 5000, 512
CAP = 1024 * 1024 * 1024
"""The address-space cap of the converting process: ~27 % of the decoded images, and much of it the interpreter's
own mappings (Python, numpy, pyarrow and PIL map several hundred MB before converting anything)."""
# The command in a process of its own that reports its own peak RSS: VmHWM, the high-water mark of this program's
# memory (getrusage's ru_maxrss would count the forking pytest process's RSS, which exec carries over).
CONVERT = (
    "import re, sys\n"
    "from megl_ray.cli import run_cli\n"
    "from megl_ray.data import convert\n"
    "code = run_cli('convert', convert.main, sys.argv[1:])\n"
    "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)\n"
    "print('peak_rss_kib', peak, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def test_a_5000_image_manifest_converts_under_a_memory_cap_below_its_decoded_size(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    # A smooth picture: a few KB as JPEG, 768 KB decoded — and each one really decoded by the converter's checks.
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    pixels = np.stack([x % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
    data = encoded.getvalue()
    rows = []
    for i in range(IMAGES):
        name = f"images/{i:05d}.jpg"
        (src / name).write_bytes(data)
        rows.append({"id": f"{i:05d}", "image": name, "label": ("even", "odd")[i % 2], "rationale": "a gradient"})
    (src / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoded = IMAGES * SIDE * SIDE * 3
    assert CAP < 0.5 * decoded

    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CONVERT, str(src), str(tmp_path / "out"), "--rows-per-shard", "128"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=_limit,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["rows_written"] == IMAGES and summary["rows_rejected"] == 0
    peak = int(proc.stderr.split("peak_rss_kib")[-1].split()[0]) * 1024
    print(f"decoded {decoded / 2**30:.2f} GiB, cap {CAP / 2**30:.2f} GiB, peak RSS {peak / 2**20:.0f} MiB")
    assert peak < decoded / 10  # one image at a time, not the dataset

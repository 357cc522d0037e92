"""Headless Chromium for the tests that render pages: found (or installed from Debian where this session may), and
asked how many of a page's images decoded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def find_chromium() -> str | None:
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
CHECK_SCRIPT = (
    '<script>window.addEventListener("load", () => {const all = [...document.images];'
    "const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;"
    'const p = document.createElement("pre"); p.id = "img-check";'
    'p.textContent = "loaded=" + ok + " total=" + all.length; document.body.appendChild(p);});</script>'
)


def loaded_images(chromium: str, page: Path, profile: Path) -> tuple[int, int]:
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

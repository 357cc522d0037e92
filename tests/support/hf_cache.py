"""Models placed where ``huggingface_hub`` looks for them offline: a folder written by a test becomes snapshot
``<sha>`` of ``org/name`` in an HF cache layout (``models--org--name/snapshots/<sha>/``, ``refs/<branch>``)."""

from __future__ import annotations

import shutil
from pathlib import Path

SHA1, SHA2 = "1" * 40, "2" * 40


def place_in_cache(cache: Path, repo: str, folder: Path, sha: str, ref: str = "main") -> None:
    """Place ``folder`` as snapshot ``sha`` of ``repo`` in the HF cache at ``cache``, ``ref`` pointing at it."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / sha)
    (entry / "refs").mkdir(parents=True, exist_ok=True)
    (entry / "refs" / ref).write_text(sha)

"""Small real-image datasets bundled with megl_ray, for tests, demos and smoke runs without any download."""

from __future__ import annotations

from pathlib import Path


def sample_dataset_path() -> Path:
    """Folder of the bundled digits sample (MEGL source layout; see its README.md for how it was made)."""
    return Path(__file__).resolve().parent / "digits"

"""Small real-image datasets bundled with megl_ray, for tests, demos and smoke runs without any download."""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_SAMPLE = Path(__file__).resolve().parent / "digits"
"""The bundled digits sample (1,000 images; MEGL source layout; see its README.md for how it was made)."""
SAMPLE_ENV = "MEGL_SAMPLE_DIR"


def sample_dataset_path() -> Path:
    """Folder of the sample the no-data default trains on: the bundled digits, or the folder in ``$MEGL_SAMPLE_DIR``
    (same layout). The test suite points it at a 400-image generation of the same data (``make_sample
    --n-per-class 40``): its end-to-end tests exercise the machinery, and 2.5× fewer images keep CI short."""
    override = os.environ.get(SAMPLE_ENV)
    return Path(override) if override else BUNDLED_SAMPLE

"""The environment of a project command the tests run as a subprocess (``python -m megl_ray.train`` and friends)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ISOLATED = (
    "MEGL_S3_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "RAY_ADDRESS",
)
"""What would point a command at this machine's own S3 or Ray instead of the embedded default it should start."""


def subprocess_env(drop: Iterable[str] = (), **extra: str) -> dict[str, str]:
    """``os.environ`` without ``drop``, with this venv's tools first on PATH (one ninja for DeepSpeed's kernels), the
    checkout importable, DeepSpeed's kernel cache kept between runs, and ``extra`` set."""
    dropped = set(drop)
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "megl_ray" / "torch_extensions"))
    env.update(extra)
    return env

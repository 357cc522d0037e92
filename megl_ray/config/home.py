"""Where megl_ray keeps what outlives a process on this machine: the embedded store's data, compiled kernels,
credentials files, local run directories and caches. ``$MEGL_HOME``, default ``~/.cache/megl_ray``."""

from __future__ import annotations

import os
from pathlib import Path


def megl_home() -> Path:
    return Path(os.environ.get("MEGL_HOME", Path.home() / ".cache" / "megl_ray"))

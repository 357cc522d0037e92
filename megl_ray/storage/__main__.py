"""``python -m megl_ray.storage serve --data-dir DIR`` (see :mod:`megl_ray.storage.serve`)."""

import sys

from megl_ray.cli import run_cli
from megl_ray.storage.serve import main

sys.exit(run_cli("python -m megl_ray.storage", main))

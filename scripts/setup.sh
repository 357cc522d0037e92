#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs megl_ray into it, editable.
#
# The environment lives outside the checkout (default ~/.cache/megl_ray/venv, override with MEGL_VENV) so that a
# fresh clone reuses the multi-GB torch/ray/deepspeed install; dependencies are re-resolved whenever pyproject.toml
# changes. Prints the venv's python path on its last line.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MEGL_VENV:-$HOME/.cache/megl_ray/venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
stamp="$venv/.megl_ray-pyproject.sha256"
want=$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "setup: installing dependencies (first run downloads torch, ray, deepspeed: several minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools wheel >&2
  "$venv/bin/python" -m pip install -q -e "$repo[dev]" >&2
  echo "$want" >"$stamp"
else
  # Same dependencies: only point the editable install at this checkout (a few seconds).
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$repo" >&2
fi
# The animal silhouettes of bench/ablation.py --benchmark animals (megl_ray.data.make_animals): data files only,
# so without the package's declared dependencies (tensorflow, which nothing here uses).
if ! "$venv/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('animal_mnist') is None)"; then
  "$venv/bin/python" -m pip install -q --no-deps animal-mnist==0.4 >&2
fi
echo "$venv/bin/python"

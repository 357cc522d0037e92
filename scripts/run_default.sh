#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job on the embedded default: the bundled dataset,
# the tiny preset, 2 Ray Train workers under DeepSpeed, the embedded S3 server. Last stdout line: result.json.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
export PATH="$(dirname "$py"):$PATH"  # the venv's tools first (its ninja builds DeepSpeed's kernels)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megl_ray/torch_extensions}
exec "$py" -m megl_ray.train "$@"

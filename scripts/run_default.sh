#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the main job on the embedded default: the bundled dataset,
# the tiny preset, on this machine. Its last stdout line is the job's result as one JSON object.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/setup.sh" | tail -n 1)
cd "$repo"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megl_ray/torch_extensions}
exec "$py" -m megl_ray.train_local "$@"

#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh), lints, and runs both test tiers. CI runs exactly this (.ci/run).
#   bash scripts/test.sh                      ruff (lint + format), then tests/unit and tests/integration
#   bash scripts/test.sh tests/unit           one tier (or any pytest arguments: -k, a file, ...)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/setup.sh" | tail -n 1)
bin=$(dirname "$py")
# The gallery test renders HTML in headless Chromium (Debian's package); install it where we may.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >&2 || echo "test: could not install chromium" >&2
fi
cd "$repo"
# Every process of the run (pytest, the subprocesses and Ray workers it starts) finds the venv's tools first: with
# the venv's ninja for some and Debian's for others, DeepSpeed's JIT kernels were rebuilt (~50 s) at each switch,
# since the two ninja versions record their build commands differently.
export PATH="$bin:$PATH"
"$bin/ruff" check --quiet .
"$bin/ruff" format --check --quiet .
# DeepSpeed compiles a CPU kernel on first use (~1 min): keep it between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megl_ray/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
[ $# -gt 0 ] || set -- tests/unit tests/integration
exec "$py" -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 "$@"

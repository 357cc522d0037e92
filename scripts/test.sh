#!/usr/bin/env bash
# Sets up the environment (scripts/setup.sh) and runs the whole test suite. CI runs exactly this (.ci/run).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/scripts/setup.sh" | tail -n 1)
# The gallery test renders HTML in headless Chromium (Debian's package); install it where we may.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >&2 || echo "test: could not install chromium" >&2
fi
cd "$repo"
# DeepSpeed compiles a CPU kernel on first use (~1 min): keep it between runs.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/megl_ray/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec "$py" -m pytest -q -p no:cacheprovider --timeout=900 "$@"

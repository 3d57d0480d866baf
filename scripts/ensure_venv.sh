#!/usr/bin/env bash
# Creates or reuses the project virtualenv and installs the project into it with
# the pinned versions of constraints.txt. Sourced by run_local.sh and run_tests.sh.
# Installs only when setup.py or constraints.txt changed since the last install.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${IMGEMBED_VENV:-$repo_root/.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  if ! "$python" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
    echo "imgembed needs Python 3.10-3.12 (the pins are for 3.11); set PYTHON=/path/to/python3.11" >&2
    exit 1
  fi
  echo "Creating virtualenv $VENV"
  "$python" -m venv "$VENV"
fi

stamp="$VENV/.imgembed-installed-$(cat "$repo_root/setup.py" "$repo_root/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Installing imgembed and its pinned dependencies into $VENV (first run: a few minutes, ~3 GB)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c "$repo_root/constraints.txt" -e "$repo_root[test]"
  rm -f "$VENV"/.imgembed-installed-*
  touch "$stamp"
fi

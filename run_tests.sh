#!/usr/bin/env bash
# Sets up .venv (and the test tools' own virtualenvs) on first use, then runs the
# linter and the whole test suite.
# Extra arguments go to pytest (e.g. ./run_tests.sh -k decode -x).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
source scripts/ensure_test_tools.sh

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/pytest" "$@"

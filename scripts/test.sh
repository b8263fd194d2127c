#!/usr/bin/env bash
# The one test command: lint, format check, type check, tests; stops at the first failure.
# Works from a fresh clone (it makes .venv first). Arguments go to pytest: scripts/test.sh -k mqtt
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

ruff check .
ruff format --check .
mypy edge
pytest "$@"

#!/usr/bin/env bash
# Make .venv and install edge-inspect into it (editable, with the dev tools). Safe to run again:
# it reinstalls only when pyproject.toml changed since the last install, so the scripts that
# call it first (test.sh, demo.sh) stay quick.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x .venv/bin/python ]]; then
    "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.edge-inspect-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" || ! -x .venv/bin/edge-inspect ]]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-input -e '.[dev]'
    echo "$wanted" >"$stamp"
fi

#!/usr/bin/env bash
# The README's test command: set up (idempotent), lint, check formatting, then run every test.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"` for the fast tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python -m ruff check .
python -m ruff format --check .
python -m pytest -q "$@"

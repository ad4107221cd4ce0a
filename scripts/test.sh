#!/usr/bin/env bash
# Set up (if needed), lint (ruff), type-check the core (mypy) and run the test suite.
# The benchmark extra is installed too, so the MONAI peer of `mtseg bench` is tested.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-train,test,bench} ./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q Testing "$@"

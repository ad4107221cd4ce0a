#!/usr/bin/env bash
# Set up (if needed) and run the test suite (the benchmark extra too, so the MONAI peer is tested).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${EXTRAS:-train,test,bench} ./scripts/setup.sh
exec .venv/bin/python -m pytest -q Testing "$@"

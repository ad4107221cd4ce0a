#!/usr/bin/env bash
# Regenerate BENCHMARKS.md (and BENCHMARKS.json) at the repository root.
# Needs the bench extra: .venv/bin/pip install -e '.[bench]'  (MONAI, psutil, nibabel; torch stays as pinned)
# On a shared machine run it niced; ratios measured in the same run stay meaningful.
set -euo pipefail
cd "$(dirname "$0")/.."
exec nice -n "${NICE:-10}" .venv/bin/mtseg bench --output BENCHMARKS.md "$@"

#!/usr/bin/env bash
# Create .venv with the CPU build of torch and MultiTaskSeg (core + training + test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[${EXTRAS:-train,test}]"

#!/usr/bin/env bash
# Create .venv with PyTorch and MultiTaskSeg (core + training + test extras by default; EXTRAS=... to choose).
#
# PyTorch comes first and pinned, from the index in TORCH_INDEX_URL when it is set:
#   - unset (default): pip's configured index. On this project's machines that serves the CPU build
#     of torch 2.13.0; on a plain Linux machine PyPI's torch wheel brings the CUDA libraries (several GB).
#   - a user without a GPU who wants the small CPU build: TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   - a GPU user: leave it unset (PyPI's Linux wheel is the CUDA build) or name the CUDA index of your choice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install -q "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"
else
    .venv/bin/pip install -q "torch==${TORCH_VERSION}"
fi
# torch is installed: the package's torch>=2.1 range is satisfied and pip leaves it alone
.venv/bin/pip install -q -e ".[${EXTRAS:-train,test}]"

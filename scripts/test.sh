#!/usr/bin/env bash
# Set up (if needed) and run vlframe's tests: bash scripts/test.sh [pytest arguments]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
cd "$root"
# Triton kernels run in Triton's interpreter on CPU tensors; it must be on before Python starts.
# (A GPU machine runs them compiled: scripts/gpu_check.sh.)
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec .venv/bin/python -m pytest "$@"

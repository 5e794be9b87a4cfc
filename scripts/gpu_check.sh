#!/usr/bin/env bash
# GPU checks for the Triton attention kernels, sized for a short GPU reservation (< 5 minutes):
# the kernel tests compiled for real (bf16 among them), then benchmarks/attention.py.
#
#   bash scripts/gpu_check.sh --prepare   # here, with network: fetch the wheels the GPU box lacks
#   bash scripts/gpu_check.sh             # on the GPU machine (carry .gpu-wheels along)
#
# The GPU machines here have torch and triton but neither pydantic nor MLflow: the kernels and
# the benchmark need neither; the test of a whole CoCa step needs pydantic (carried as wheels).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    # Wheels for the GPU image's Python (3.12, x86_64 manylinux).
    "$python" -m pip download --quiet --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-wheels \
        pydantic pluggy pyyaml
    echo "wheels in .gpu-wheels/ (git-ignored); carry that folder to the GPU machine"
    exit 0
fi

unset TRITON_INTERPRET   # real compilation
deps=/tmp/vlframe-gpu-deps
if ! "$python" -c "import pydantic" 2>/dev/null && [ -d .gpu-wheels ]; then
    "$python" -m pip install --quiet --no-index --no-deps --target "$deps" .gpu-wheels/*.whl
fi
export PYTHONPATH="$root:$deps${PYTHONPATH:+:$PYTHONPATH}"
# The built-in plugins register through entry points: install this checkout's metadata.
"$python" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . 2>/dev/null \
    || echo "gpu_check: could not install vlframe's entry points; the CoCa-step test may fail" >&2
"$python" -c "import torch, triton; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

status=0
timeout 200 "$python" -m pytest -q -p no:cacheprovider tests/test_triton_attention.py || status=$?
timeout 150 "$python" benchmarks/attention.py --batch 32 || status=$?
exit $status

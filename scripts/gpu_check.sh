#!/usr/bin/env bash
# GPU checks for the Triton attention kernels, sized for a short GPU reservation (< 5 minutes):
# the kernel tests compiled for real (bf16 among them), then benchmarks/attention.py.
#
#   bash scripts/gpu_check.sh --prepare   # here, with network: fetch the wheels the GPU box lacks
#   bash scripts/gpu_check.sh             # on the GPU machine (carry .gpu-wheels along)
#
# The GPU machines here have torch and triton but neither pydantic nor MLflow: the kernels and
# the benchmark need neither; the test of a whole CoCa step needs pydantic (carried as wheels).
set -uo pipefail
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
# The built-in plugins register through entry points. Rather than installing this checkout
# (its build needs a newer setuptools than the GPU image may have), write the distribution
# metadata importlib.metadata reads, on the path beside the carried wheels.
mkdir -p "$deps"
"$python" - "$deps" <<'PY'
import pathlib, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
info = pathlib.Path(sys.argv[1]) / f"vlframe-{project['version']}.dist-info"
info.mkdir(parents=True, exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vlframe\nVersion: {project['version']}\n")
lines = ["[vlframe]"] + [f"{k} = {v}" for k, v in project["entry-points"]["vlframe"].items()]
(info / "entry_points.txt").write_text("\n".join(lines) + "\n")
PY
"$python" -c "import torch, triton; print('GPU:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

export PYTHONUNBUFFERED=1            # nothing lost in a pipe if a step times out
log=${OUT:-/tmp}/gpu_check.log       # the device tool brings $OUT back
status=0
# The tests compile one configuration per kernel (VLFRAME_TRITON_AUTOTUNE=0): a search over every
# configuration for each small test shape would take minutes of compilation for nothing.
VLFRAME_TRITON_AUTOTUNE=0 timeout 150 "$python" -m pytest -q -p no:cacheprovider tests/test_triton_attention.py \
    2>&1 | tee "$log" || status=$?
TRITON_PRINT_AUTOTUNING=1 timeout 200 "$python" benchmarks/attention.py --batch 32 2>&1 | tee -a "$log" || status=$?
exit $status

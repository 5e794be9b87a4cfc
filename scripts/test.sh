#!/usr/bin/env bash
# Set up (if needed) and run vlframe's tests:
#
#   bash scripts/test.sh [--cpu native|avx2|bf16|all] [pytest arguments]
#
# --cpu runs the suite as a kind of CPU (checked by scripts/cpu_probe.py before anything runs):
#   native  this CPU as it is (auto precision: bf16 where native, else float32); the default
#   avx2    a CPU without AVX-512: float32, with PyTorch's kernels, Inductor's generated code,
#           MKL and oneDNN held to AVX2
#   bf16    bf16 autocast for auto precision (only where this CPU computes bf16 natively)
#   all     the three in turn (bf16 left out where not native), each timed
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cpu=native
if [ "${1:-}" = "--cpu" ]; then
    cpu=${2:?--cpu needs native, avx2, bf16 or all}
    shift 2
fi
bash "$root/scripts/setup.sh"
cd "$root"
# Triton kernels run in Triton's interpreter on CPU tensors; it must be on before Python starts.
# (A GPU machine runs them compiled: scripts/gpu_check.sh.)
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}

run_as() {  # run_as KIND PYTEST_ARGS...
    local kind=$1
    shift
    case "$kind" in
        native) ;;
        avx2) export VLFRAME_PRECISION=fp32 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
        bf16) export VLFRAME_PRECISION=bf16 ;;
        *) echo "scripts/test.sh: --cpu $kind: choose native, avx2, bf16 or all" >&2; return 2 ;;
    esac
    echo "== the suite as a CPU of kind '$kind'" >&2
    .venv/bin/python scripts/cpu_probe.py --expect "$kind" 2>/dev/null >&2 || {
        .venv/bin/python scripts/cpu_probe.py --expect "$kind" >&2; return 2; }
    .venv/bin/python -m pytest "$@"
}

if [ "$cpu" != all ]; then
    run_as "$cpu" "$@"
    exit $?
fi
kinds=(native avx2)
if .venv/bin/python scripts/cpu_probe.py --expect bf16 >/dev/null 2>&1; then
    kinds+=(bf16)
else
    echo "scripts/test.sh: bf16 left out: this CPU computes bf16 only by emulation" >&2
fi
summary=()
status=0
for kind in "${kinds[@]}"; do
    began=$(date +%s)
    if (run_as "$kind" "$@"); then result=passed; else result=FAILED; status=1; fi
    summary+=("$kind: $result in $(( $(date +%s) - began )) s")
done
printf '%s\n' "${summary[@]}" >&2
exit $status

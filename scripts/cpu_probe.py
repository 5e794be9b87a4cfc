"""Which CPU this is, and what PyTorch, Inductor, oneDNN and MKL will use on it here: one line each.

    python scripts/cpu_probe.py [--expect native|avx2|bf16]

``--expect avx2`` checks that the emulation of a CPU without AVX-512 took effect (scripts/test.sh
--cpu avx2 sets it): ATen's kernels, Inductor's generated C++ and oneDNN held to AVX2, float32 for
``auto``; ``--expect bf16`` that ``auto`` precision runs bf16 natively. Exit 1 with the line that
failed otherwise. MKL reports its instruction set only on Intel CPUs; elsewhere the line says so.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

ONEDNN = "import torch; torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 4, 4), stride=4)"
MKL = "import torch; a = torch.randn(64, 64); a @ a"


def _verbose(code: str, env_name: str, pattern: str) -> str | None:
    env = {**os.environ, env_name: "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300).stdout
    found = re.search(pattern, out)
    return found.group(1).strip() if found else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", choices=("native", "avx2", "bf16"))
    args = parser.parse_args()

    import torch
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    from vlframe.runtime.precision import native_bf16, resolve_precision

    flags: set[str] = set()
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    aten = torch.backends.cpu.get_cpu_capability()
    inductor = str(pick_vec_isa()) or "none"
    onednn = _verbose(ONEDNN, "ONEDNN_VERBOSE", r"isa:([^\n]+)")
    mkl = _verbose(MKL, "MKL_VERBOSE", r"for Intel\(R\) 64 architecture (.*?), Lnx")
    auto = resolve_precision("auto", torch.device("cpu"))
    print(f"CPU: {model} ({os.cpu_count()} cores); flags: {', '.join(shown) or 'no AVX'}")
    if mkl is not None and "Architecture processors" in mkl:  # what MKL says on a CPU not made by Intel
        mkl += " (MKL names the instruction set it runs on Intel CPUs only)"
    print(f"  ATen kernels: {aten}; Inductor vector ISA: {inductor}; oneDNN: {onednn or 'not reported'}; "
          f"MKL: {mkl or 'not reported'}")
    print(f"  bf16 native: {'yes' if native_bf16(torch.device('cpu')) else 'no'}; precision auto -> {auto}"
          f"{' (VLFRAME_PRECISION=' + os.environ['VLFRAME_PRECISION'] + ')' if os.environ.get('VLFRAME_PRECISION') else ''}")
    wrong = []
    if args.expect == "avx2":
        wrong += [f"ATen runs {aten}"] if aten != "AVX2" else []
        wrong += [f"Inductor generates {inductor}"] if "avx512" in inductor or "amx" in inductor else []
        wrong += [f"oneDNN runs {onednn}"] if onednn and ("512" in onednn or "AMX" in onednn) else []
        wrong += [f"MKL runs {mkl}"] if mkl and "512" in mkl else []
        wrong += [f"auto precision is {auto}"] if auto != "fp32" else []
    elif args.expect == "bf16":
        wrong += [f"auto precision is {auto}, not native bf16"] if auto != "bf16" else []
    if wrong:
        print(f"error: the {args.expect} configuration did not take effect: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

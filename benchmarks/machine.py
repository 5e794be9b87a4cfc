"""What every benchmark prints first: the CPU, whether it computes bf16 natively, and the
precisions worth measuring on it (bf16 only where native: emulated bf16 runs many times slower
than float32 and says nothing about vlframe)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(threads: int) -> tuple[str, bool]:
    """One line naming the machine, and whether bf16 is native here."""
    import torch

    from vlframe.runtime.precision import native_bf16

    native = native_bf16(torch.device("cpu"))
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            words = set(next((line for line in handle if line.startswith("flags")), "").split())
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in words)
    except OSError:
        pass
    line = (f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, {threads} threads used; {flags or 'no AVX flags'}); "
            f"bf16 native: {'yes' if native else 'no'}; torch {torch.__version__}, python {platform.python_version()}")
    return line, native


def precisions(asked: str, native: bool, say=print) -> list[str]:
    """The precisions to run: ``asked`` (fp32, bf16 or both), bf16 left out with a line where emulated."""
    modes = ["fp32", "bf16"] if asked == "both" else [asked]
    if "bf16" in modes and not native:
        say("bf16 skipped: this CPU has no native bf16 (AVX-512 BF16 or AMX), so bf16 would be emulated, many "
            "times slower than float32; `vlframe train` uses float32 here")
        modes.remove("bf16")
    return modes

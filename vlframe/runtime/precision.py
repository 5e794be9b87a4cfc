"""Numeric precision: what ``auto`` means on this machine, and the autocast context for a choice.

``auto`` is bf16 autocast where bf16 matmuls run natively (CUDA GPUs that support it, CPUs with
AVX-512 BF16 or AMX: 2-5x faster there) and float32 elsewhere. ``VLFRAME_PRECISION=fp32`` (or
``bf16``) decides what ``auto`` means instead, e.g. to run the test suite in float32 on a CPU
that has bf16; an explicit ``fp32``/``bf16`` setting is never changed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

#: What ``auto`` resolves to, when set (fp32 or bf16).
ENV_PRECISION = "VLFRAME_PRECISION"
PRECISIONS = ("auto", "fp32", "bf16")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls natively (rather than emulating them)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(setting: str, device: torch.device) -> str:
    """``fp32`` or ``bf16`` for a precision setting (``auto``, ``fp32``, ``bf16``) on ``device``."""
    if setting not in PRECISIONS:
        raise ValueError(f"unknown precision '{setting}'; choose {', '.join(PRECISIONS)}")
    if setting != "auto":
        return setting
    forced = os.environ.get(ENV_PRECISION, "").strip().lower()
    if forced in ("fp32", "bf16"):
        return forced
    if forced not in ("", "auto"):
        raise ValueError(f"{ENV_PRECISION}={forced}: expected fp32, bf16 or auto")
    return "bf16" if native_bf16(device) else "fp32"


def autocast(precision: str, device: torch.device) -> Any:
    """bf16 autocast on ``device`` for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

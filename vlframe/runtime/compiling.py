"""``torch.compile``'s on-disk caches, keyed by the CPU's vector instruction set.

torch 2.14 keeps compiled graphs between processes (Inductor's FX-graph cache, the AOTAutograd
cache, by default under ``/tmp/torchinductor_$USER``), and their key leaves out the vector ISA
Inductor writes C++ for, which ``ATEN_CPU_CAPABILITY`` chooses. A graph compiled with 16-float
AVX-512 loops is then reloaded by a process held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``, how a CPU
without AVX-512 is emulated, or a cache shared by machines of two kinds), rebuilt for 8-float
vectors, and computes garbage: NaN losses, wrong tokens, a corrupted heap the other way round.
:func:`key_caches_by_isa` adds the ISA to torch's own cache key (``cache_key_tag``) before vlframe
compiles anything, here and in the processes this one starts.
"""

from __future__ import annotations

import os

_ENV = "TORCH_COMPILE_CACHE_KEY_TAG"


def key_caches_by_isa() -> str:
    """Add ``cpu_isa=<ATen's CPU capability>`` to torch's compile-cache key; return the tag."""
    import torch

    isa = f"cpu_isa={torch.backends.cpu.get_cpu_capability()}"
    tag = torch.compiler.config.cache_key_tag or os.environ.get(_ENV, "")
    if isa not in tag.split(","):
        tag = f"{tag},{isa}" if tag else isa
    os.environ[_ENV] = tag  # for the processes this one starts (torchrun ranks, sweep variants)
    torch.compiler.config.cache_key_tag = tag
    return tag


__all__ = ["key_caches_by_isa"]

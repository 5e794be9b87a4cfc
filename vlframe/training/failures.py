"""How a training run fails: the errors it raises, and system failures said in words.

Each is a :class:`registry.VlframeError` (one message, exit code 2): the run stopped for a reason
the user can act on, and the last good checkpoint is intact.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from registry import VlframeError, in_one_line
from vlframe.runs import checkpoint


class Interrupted(VlframeError):
    """Training stopped on a signal; a checkpoint was written."""


class NumericalError(VlframeError):
    """The loss or the gradients stopped being finite; training stopped before the optimiser step."""


class OutOfMemory(VlframeError):
    """An allocation failed while training (the message says at which batch size, and what to change)."""


def in_words(exc: BaseException, *, where: Path, step: int, batch_size: int, world: int,
             grad_accum: int) -> BaseException:
    """A full disk or exhausted memory as the message a user can act on (else ``exc`` itself).
    ``where``: the run folder (or the output folder before there is one)."""
    if not isinstance(exc, VlframeError) and checkpoint.no_space(exc):
        place = Path(getattr(exc, "filename", None) or where)
        return checkpoint.DiskFullError(f"no space left on the device writing {place} "
                                        f"({checkpoint.free_space(place) / 2**20:.0f} MiB free there): free some "
                                        "space, then --resume; the checkpoints written before are intact")
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and out_of_memory(exc)):
        micro = batch_size // (world * grad_accum)
        return OutOfMemory(
            f"out of memory at step {step + 1} ({allocation(exc)}) with train.batch_size {batch_size} "
            f"({world} rank(s) x {grad_accum} micro-batch(es) of {micro}): lower train.batch_size, or keep "
            f"it and raise train.grad_accum (e.g. {grad_accum * 2}) so each micro-batch needs less memory")
    return exc


def out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def allocation(exc: BaseException) -> str:
    """What could not be allocated, from the allocator's message."""
    text = str(exc)
    if isinstance(exc, MemoryError):
        return "Python could not allocate memory"
    found = re.search(r"tried to allocate (\d+) bytes", text)
    if found:
        return f"the CPU allocator could not get {int(found.group(1)) / 2**30:.2f} GiB more"
    found = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text)
    if found:
        return f"the GPU could not give {found.group(1)} more"
    return in_one_line(text, 200)


__all__ = ["Interrupted", "NumericalError", "OutOfMemory", "in_words"]

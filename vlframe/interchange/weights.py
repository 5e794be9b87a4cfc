"""Reading another framework's weights file without running anything it holds.

``.safetensors`` holds tensors and nothing else. A PyTorch file (``.pt``, ``.pth``, ``.bin``) is
a pickle, which can hold code that runs when it is loaded: it is read with
``torch.load(weights_only=True)``, which takes only tensors, containers and numbers, and a file
holding anything else is refused with one line naming what it holds.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from registry import one_line
from vlframe.runs.checkpoint import refusal


def read_weights_file(path: str | Path) -> Any:
    """The tensors (usually a state dict) in ``path``; ``ValueError`` (one line, naming the file)
    for a file that cannot be read or that would run code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path}: refused: {refusal(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - truncated, foreign, not weights at all
        raise ValueError(f"{path}: not a readable weights file ({one_line(exc, hint=False)})") from None

"""Checkpoints: safetensors weights plus everything needed to continue exactly.

A checkpoint is a folder holding ``model.safetensors``, ``state.pt`` (step, and for training
checkpoints the optimiser, scheduler, RNG states and tracking run id), ``config.yaml`` and the
tokenizer. :func:`write` is the one writer of checkpoint folders (training's ``step_NNNNNN/``
and converted models alike): it writes under a temporary name beside the target and renames it
into place, so a crash mid-write never leaves a half checkpoint where ``--resume`` would look.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

STATE = "state.pt"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
#: The folder of a run that holds its checkpoints.
FOLDER = "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write(target: Path, model: nn.Module, state: dict[str, Any], files: dict[str, Path | str]) -> Path:
    """Write the checkpoint folder ``target`` atomically (replacing one already there); return it.

    ``files`` maps names to copy in (paths) or to write (text), e.g. the config and tokenizer.
    """
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / WEIGHTS))  # handles tied weights (saved once)
        torch.save(state, tmp / STATE)
        for name, content in files.items():
            if isinstance(content, Path):
                shutil.copyfile(content, tmp / name)
            else:
                (tmp / name).write_text(content, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    extra: dict[str, Any],
    files: dict[str, Path | str],
) -> Path:
    """Write the training checkpoint ``directory/step_{step:06d}`` and return it."""
    sweep_partial(directory)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), **extra}
    return write(step_folder(directory, step), model, state, files)


def step_folder(directory: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes in a checkpoints folder: ``step_000300``."""
    return directory / f"step_{step:06d}"


def load_fitting(path: Path, model: nn.Module) -> tuple[list[str], list[str]]:
    """Load the weights of checkpoint ``path`` whose names and shapes fit ``model``; return the
    model's parameters left as they were and the checkpoint's weights not used."""
    from safetensors.torch import load_file

    saved = load_file(str(path / WEIGHTS))
    own = model.state_dict()
    fitting = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    loaded = {own[k].data_ptr() for k in fitting}  # a tied weight is loaded through its twin
    fresh = [k for k in own if k not in fitting and own[k].data_ptr() not in loaded]
    return sorted(fresh), sorted(set(saved) - set(fitting))


def sweep_partial(directory: Path) -> list[Path]:
    """Remove half-written checkpoints whose writer is gone (a SIGKILL or power loss mid-save).

    They are never read (``find`` only sees complete ``step_*`` folders); this only frees their space.
    A folder of a writer that is still alive (another run sharing the directory) is left alone.
    """
    removed = []
    for partial in directory.glob(".step_*.tmp*"):
        pid = partial.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(partial, ignore_errors=True)
        removed.append(partial)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> dict[str, Any]:
    """Restore weights (and optimiser/scheduler when given) from a checkpoint folder; return its state."""
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    state = read_state(path)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder."""
    return (path / STATE).is_file()


def read_state(path: Path) -> dict[str, Any]:
    """The ``state.pt`` of checkpoint ``path``."""
    return torch.load(path / STATE, map_location="cpu", weights_only=False)


def find(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest checkpoint in a run folder."""
    if is_checkpoint(path):
        return path
    folder = path / FOLDER if (path / FOLDER).is_dir() else path
    found = sorted(p for p in folder.glob("step_*") if (p / STATE).is_file())
    return found[-1] if found else None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = sorted(p for p in directory.glob("step_*") if (p / STATE).is_file())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

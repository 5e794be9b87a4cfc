"""Checkpoints: safetensors weights plus everything needed to continue exactly.

A checkpoint is a folder ``step_000300/`` holding ``model.safetensors``, ``state.pt``
(optimiser, scheduler, step, RNG states, tracking run id), ``config.yaml`` and the tokenizer.
It is written under a temporary name and renamed into place, so a crash mid-write never leaves
a half checkpoint where ``--resume`` would look.
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
    """Write ``directory/step_{step:06d}`` atomically and return it.

    ``files`` maps names to copy in (paths) or to write (text), e.g. the config and tokenizer.
    """
    final = directory / f"step_{step:06d}"
    tmp = directory / f".step_{step:06d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    sweep_partial(directory)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))  # handles tied weights (saved once)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state(), **extra}, tmp / STATE)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp / name)
        else:
            (tmp / name).write_text(content, encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


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
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def find(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest checkpoint in a run folder."""
    if (path / STATE).is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(p for p in folder.glob("step_*") if (p / STATE).is_file())
    return found[-1] if found else None


def run_dir_of(path: Path) -> Path:
    """The run folder of ``path``: itself, or the run a checkpoint folder belongs to."""
    if (path / STATE).is_file() and path.parent.name == "checkpoints":
        return path.parent.parent
    return path


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = sorted(p for p in directory.glob("step_*") if (p / STATE).is_file())
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

"""How a checkpoint stores the model and optimiser tensors, and reading them back in either format.

whole      ``model.safetensors`` (every weight; tied weights once) and the optimiser's state in
           ``state.json`` + ``state.safetensors``: written by rank 0 alone, read anywhere
sharded    ``sharded/``: every rank's shards (:mod:`vlframe.runs.sharded`), resharded on load

A parallel strategy chooses the format it writes (:func:`save_whole`, :func:`save_sharded`,
exported to plugins by ``vlframe.sdk``); reading needs no strategy: :func:`load` and
:func:`read_weights` tell the formats apart by the folder's contents, so every command loads
every checkpoint, and a run resumes under another strategy where the format allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from registry import one_line
from vlframe.runs import sharded
from vlframe.runs.checkpoint import WEIGHTS, CheckpointError, read_state


def save_whole(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Write ``model`` into ``folder/model.safetensors``; return the state entries holding the
    optimiser's state (rank 0 calls this alone)."""
    save_model(model, str(folder / WEIGHTS))  # tied weights are saved once
    return {"optimizer": optimizer.state_dict()} if optimizer is not None else {}


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every rank writes its shards into ``folder/sharded``; the state entries describing them."""
    return sharded.save(folder, model, optimizer)


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` holds its tensors sharded."""
    return sharded.is_sharded(path) and not (path / WEIGHTS).is_file()


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes this rank's part of ``model`` and ``optimizer`` takes (a shard's local tensors), roughly."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.state_dict().values())
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.data_ptr() not in seen:
            seen.add(local.data_ptr())
            total += local.numel() * local.element_size()
    return total


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole weights of checkpoint ``path``, in either format, in this process; a
    :class:`CheckpointError` naming the file when they cannot be read."""
    if is_sharded(path):
        try:
            return sharded.read_weights(path, tied=_tied(path))
        except Exception as exc:  # noqa: BLE001 - a truncated shard, or a foreign file
            raise CheckpointError(f"{path / sharded.SHARDS}: unreadable ({one_line(exc, hint=False)})") from None
    try:
        return load_file(str(path / WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {WEIGHTS}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' errors for a truncated or foreign file
        raise CheckpointError(f"{path / WEIGHTS}: unreadable ({one_line(exc, hint=False)})") from None


def _tied(path: Path) -> dict[str, str]:
    try:
        return dict(read_state(path).get("tied") or {})
    except CheckpointError:
        return {}


def _is_sharded_model(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _apply(model: nn.Module, weights: dict[str, torch.Tensor], *, strict: bool) -> None:
    """Load whole tensors into ``model``, whole or sharded (each rank keeps its shards)."""
    if not _is_sharded_model(model):
        model.load_state_dict(weights, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the weights (and the optimiser, when given) of checkpoint ``path``, in either
    format, into ``model`` (whole or sharded); return its state.

    Raises :class:`CheckpointError` for a checkpoint that cannot be read, ``ValueError`` /
    ``RuntimeError`` for one that does not fit the model, ``KeyError`` when the optimiser state
    asked for is not there (not a training checkpoint)."""
    state = read_state(path) if state is None else state  # the state first: a refused one touches nothing
    if is_sharded(path):
        sharded.load(path, model, optimizer, state)
        return state
    if optimizer is not None and _is_sharded_model(model):
        raise ValueError("it was written whole, and its optimiser state resumes only where every rank holds the whole "
                         "model; to go on sharded, start from its weights with train.init_from")
    saved = read_weights(path)
    own = model.state_dict(keep_vars=True)
    # Tied weights are stored once, under one of their names.
    missing = [k for k in own if k not in saved and not any(own[k] is own[o] and o in saved for o in own)]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS} does not fit the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    _apply(model, saved, strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def load_fitting(path: Path, model: nn.Module) -> tuple[list[str], list[str]]:
    """Load the weights of checkpoint ``path`` whose names and shapes fit ``model``; return the
    model's parameters left as they were and the checkpoint's weights not used."""
    saved = read_weights(path)
    own = model.state_dict(keep_vars=True)
    shapes = {k: tuple(v.shape) for k, v in own.items()}  # a DTensor's shape is the whole one
    fitting = {k: v for k, v in saved.items() if k in shapes and shapes[k] == tuple(v.shape)}
    _apply(model, fitting, strict=False)
    loaded = {id(own[k]) for k in fitting}  # a tied weight is one Parameter: loaded through its twin
    fresh = [k for k in own if k not in fitting and id(own[k]) not in loaded]
    return sorted(fresh), sorted(set(saved) - set(fitting))


#: The name ``vlframe.sdk`` gives :func:`load` (strategies restore checkpoints with it).
load_checkpoint = load


__all__ = ["is_sharded", "load", "load_checkpoint", "load_fitting", "local_bytes", "read_weights", "save_sharded",
           "save_whole"]

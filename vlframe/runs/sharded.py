"""Sharded checkpoints (``train.parallel: fsdp``) with ``torch.distributed.checkpoint`` (DCP).

Layout of ``step_NNNNNN/`` (the same folder as an unsharded checkpoint, minus ``model.safetensors``):

    sharded/shard-0000R-model-00001-of-00001.safetensors   each rank's shards of the weights and of
                                                          the optimiser's tensors (DCP's safetensors
                                                          storage: offsets in the JSON header)
    state.json + state.safetensors                        step, schedule, RNG, optimiser hyper-parameters,
                                                          data position, skip ledger (rank 0)
    config.yaml, tokenizer.model

Every file is safetensors or JSON: nothing read from a checkpoint is unpickled (DCP's default
storage keeps its metadata as a pickle, which is why it is not used). DCP reshards on load, so a
checkpoint written by N ranks resumes on M ranks, sharded or not, and :func:`read_weights`
assembles whole tensors without any process group (``vlframe export``, and every inference
command reading a sharded checkpoint directly).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vlframe.runs import checkpoint
from vlframe.runtime import distributed

SHARDS = "sharded"
FORMAT = "sharded"


def is_sharded(path: Path) -> bool:
    return (path / SHARDS).is_dir()


def _group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True, **kwargs)


def _split(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensors to shard (``model.*``, ``optim.*``) and the optimiser's plain values."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {f"model.{k}": v for k, v in get_model_state_dict(model, options=_options()).items()}, {}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    tensors.update({f"optim.{k}": v for k, v in optim_sd.items() if isinstance(v, torch.Tensor)})
    plain = {k: v for k, v in optim_sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, plain


def save(directory: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
         extra: dict[str, Any], files: dict[str, Path | str]) -> Path:
    """Every rank writes its shards of ``step``'s checkpoint; rank 0 the rest; return the folder.

    Written into a temporary folder renamed into place once whole, so a kill mid-save leaves the
    previous checkpoint as the newest complete one (and the partial folder is swept later).
    """
    target = checkpoint.step_folder(directory, step)
    rank0 = not _group() or dist.get_rank() == 0
    tmp_name, setup_error = None, None
    if rank0:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            checkpoint.sweep_partial(directory)
            tmp = directory / f".{target.name}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            tmp_name = tmp.name
        except OSError as exc:  # said on every rank below: none is left waiting
            setup_error = f"cannot write {target}: {exc.strerror or exc}"
    tmp_name, setup_error = distributed.broadcast_object((tmp_name, setup_error)) if _group() else (tmp_name, setup_error)
    if setup_error is not None:
        raise checkpoint.CheckpointError(f"{setup_error}; the checkpoints before it are intact")
    tmp = directory / str(tmp_name)
    tensors, plain = _split(model, optimizer)
    problem = None
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True),
                 no_dist=not _group())
        if rank0:
            world = dist.get_world_size() if _group() else 1
            state = {"step": step, "format": FORMAT, "world": world,
                     "shard_files": sorted(p.name for p in (tmp / SHARDS).glob("*.safetensors")),
                     "optimizer_plain": plain, "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(),
                     **extra}
            checkpoint.write_state(tmp, state)
            checkpoint.finish(tmp, target, files)
    except Exception as exc:  # noqa: BLE001 - said below, after every rank knows
        problem = exc
    failed = distributed.broadcast_object(problem is not None and rank0) if _group() else problem is not None
    if problem is not None or failed:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        if problem is not None and checkpoint.no_space(problem):
            raise checkpoint.DiskFullError(
                f"no space left on the device writing {target}: the shards need about "
                f"{_bytes(tensors) / 2**20:.0f} MiB on this rank, and {checkpoint.free_space(directory) / 2**20:.0f} "
                "MiB are free there; the checkpoints before it are intact") from None
        if problem is not None:
            raise problem
        raise checkpoint.CheckpointError(f"writing {target} failed on rank 0; the checkpoints before it are intact")
    return target


def _bytes(tensors: dict[str, Any]) -> int:
    total = 0
    for t in tensors.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _quiet_load(tensors: dict[str, Any], path: Path, *, no_dist: bool) -> None:
    """``dcp.load`` without its warning that a process without a group loads alone (intended here)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=_reader(path), no_dist=no_dist)


def _reader(path: Path) -> Any:
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(path / SHARDS))


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
         scheduler: Any = None) -> dict[str, Any]:
    """Restore a sharded checkpoint into ``model`` (sharded or whole, any world size); its state.

    Raises ``RuntimeError`` when the checkpoint does not fit the model (DCP names the key)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = checkpoint.read_state(path)
    if optimizer is not None and "optimizer_plain" not in state:
        raise KeyError("optimizer")
    tensors, _ = _split(model, optimizer)
    try:
        _quiet_load(tensors, path, no_dist=not _group())
    except Exception as exc:  # DCP wraps a per-rank failure; its message names the key
        raise RuntimeError(f"{path / SHARDS}: {' '.join(str(exc).split())[:400]}") from exc
    model_sd = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, model_sd, options=_options())
    else:
        optim_sd = {k.removeprefix("optim."): v for k, v in tensors.items() if k.startswith("optim.")}
        optim_sd.update({k: tuple(v) if isinstance(v, list) else v for k, v in state["optimizer_plain"].items()})
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_options())
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model weights of a sharded checkpoint, assembled in this process (no group needed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = _reader(path)
    metadata = reader.read_metadata()
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
              if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    _quiet_load(wanted, path, no_dist=True)
    return {k.removeprefix("model."): v for k, v in wanted.items()}


def check(path: Path) -> None:
    """Raise :class:`checkpoint.CheckpointError` unless every shard file's header reads."""
    from safetensors import safe_open

    files = sorted((path / SHARDS).glob("*.safetensors"))
    if not files:
        raise checkpoint.CheckpointError(f"{path / SHARDS}: no shard files")
    try:
        import json

        listed = json.loads((path / checkpoint.STATE).read_text(encoding="utf-8")).get("shard_files") or []
    except (OSError, ValueError):
        listed = []
    missing = sorted(set(listed) - {f.name for f in files}) if isinstance(listed, list) else []
    if missing:  # a lost rank's file would leave its part of every tensor unread
        raise checkpoint.CheckpointError(f"{path / SHARDS}: {len(missing)} of {len(listed)} shard files missing "
                                         f"({', '.join(missing[:3])})")
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise checkpoint.CheckpointError(f"{file}: unreadable ({type(exc).__name__}: "
                                             f"{' '.join(str(exc).split())[:200]})") from None


__all__ = ["FORMAT", "SHARDS", "check", "is_sharded", "load", "read_weights", "save"]

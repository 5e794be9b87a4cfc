"""The sharded checkpoint format, written by every rank with ``torch.distributed.checkpoint`` (DCP).

Layout of ``step_NNNNNN/`` (the folder of :mod:`vlframe.runs.checkpoint`, minus ``model.safetensors``):

    sharded/shard-0000R-model-00001-of-00001.safetensors   each rank's shards of the weights and of
                                                          the optimiser's tensors (DCP's safetensors
                                                          storage: offsets in the JSON header)
    state.json + state.safetensors                        what :func:`save` returns (the format, the
                                                          world size, the shard files, the optimiser's
                                                          plain values, tied names) with the run's state

Every file is safetensors or JSON: nothing read from a checkpoint is unpickled (DCP's default
storage keeps its metadata as a pickle, which is why it is not used). DCP reshards on load, so a
checkpoint written by N ranks resumes on M ranks, sharded or not, and :func:`read_weights`
assembles whole tensors without any process group (``vlframe export``, and every inference
command reading a sharded checkpoint directly).

Tied weights (an LM head sharing the token embedding) are one tensor under two names; safetensors
stores no two names for one tensor, so the second name is written as an alias (``tied`` in the
state) and given the first one's tensor again on load.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from registry import in_one_line
from vlframe.runs.checkpoint import SHARDS

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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def untie(tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """``tensors`` with each tensor under one name only, and ``{alias: name}`` for the names left
    out (tied weights: the same tensor, the same view). Tensors sharing memory as different views
    are copied, since safetensors stores no two tensors sharing memory."""
    kept: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        local = _local(tensor)
        view = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride())
        if local.numel() and view in views:
            aliases[name] = views[view]
            continue
        if local.numel() and local.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        views[view] = name
        storages.add(local.untyped_storage().data_ptr())
        kept[name] = tensor
    return kept, aliases


def save(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Every rank writes its shards of ``model`` (and ``optimizer``) into ``folder/sharded``; returns
    the state entries that describe them (rank 0's name every shard file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter

    tensors, plain = _split(model, optimizer)
    tensors, tied = untie(tensors)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS), save_distributed=True),
             no_dist=not _group())
    world = dist.get_world_size() if _group() else 1
    state: dict[str, Any] = {"format": FORMAT, "world": world,
                             "shard_files": sorted(p.name for p in (folder / SHARDS).glob("*.safetensors"))}
    if optimizer is not None:
        state["optimizer_plain"] = plain
    if tied:
        state["tied"] = tied
    return state


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes this rank's shards of ``model`` and ``optimizer`` take on disk, roughly."""
    tensors, _ = _split(model, optimizer)
    return sum(_local(t).numel() * _local(t).element_size() for t in untie(tensors)[0].values())


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


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any]) -> None:
    """Restore the sharded checkpoint ``path`` (its ``state`` read) into ``model`` (sharded or whole,
    any world size) and ``optimizer``.

    Raises ``KeyError`` when the optimiser is asked for and the checkpoint has none, ``RuntimeError``
    when it does not fit the model (DCP names the key)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is not None and "optimizer_plain" not in state:
        raise KeyError("optimizer")
    tensors, _ = _split(model, optimizer)
    tied = {str(k): str(v) for k, v in dict(state.get("tied") or {}).items()}
    stored = {k: v for k, v in tensors.items() if k not in tied}
    try:
        _quiet_load(stored, path, no_dist=not _group())
    except Exception as exc:  # DCP wraps a per-rank failure; its message names the key
        raise RuntimeError(f"{path / SHARDS}: {in_one_line(exc, 400)}") from exc
    for alias, source in tied.items():
        if alias in tensors and source in stored:
            stored[alias] = stored[source]
    model_sd = {k.removeprefix("model."): v for k, v in stored.items() if k.startswith("model.")}
    if optimizer is None:
        set_model_state_dict(model, model_sd, options=_options())
        return
    optim_sd = {k.removeprefix("optim."): v for k, v in stored.items() if k.startswith("optim.")}
    optim_sd.update({k: tuple(v) if isinstance(v, list) else v for k, v in state["optimizer_plain"].items()})
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_options())


def read_weights(path: Path, tied: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The whole model weights of a sharded checkpoint, assembled in this process (no group needed);
    a tied name shares its source's tensor."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _reader(path).read_metadata()
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
              if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    _quiet_load(wanted, path, no_dist=True)
    weights = {k.removeprefix("model."): v for k, v in wanted.items()}
    for alias, source in dict(tied or {}).items():
        alias, source = str(alias), str(source)
        if alias.startswith("model.") and source.removeprefix("model.") in weights:
            weights[alias.removeprefix("model.")] = weights[source.removeprefix("model.")]
    return weights


__all__ = ["FORMAT", "is_sharded", "load", "local_bytes", "read_weights", "save", "untie"]

"""Checkpoint folders: their layout, their state, and writing one whole or not at all.

A checkpoint is a folder holding ``model.safetensors`` (the weights), ``state.json`` (step, and
for training checkpoints the optimiser's settings, the schedule, the RNG states, the data
position, the tracking run id) with ``state.safetensors`` (the state's tensors: the optimiser's
moments, torch's RNG state), ``config.yaml`` and the tokenizer. Nothing in it is unpickled: JSON
and safetensors cannot run code, so a checkpoint from anywhere (a shared tracking server, a
colleague's folder) is safe to read. Checkpoints of earlier versions (``state.pt``, a pickle)
are read with ``torch.load(weights_only=True)`` and only the few numpy types their RNG state
needs; one that holds anything else is refused, naming the file.

How the model and optimiser tensors are stored is a *format* (:mod:`vlframe.runs.formats`:
whole, ``model.safetensors``; or sharded, one file per rank); this module knows the folder
around them. :func:`write` is the one writer of checkpoint folders (training's ``step_NNNNNN/`` and converted
models alike): it writes under a temporary name beside the target and renames it into place, so
a crash mid-write never leaves a half checkpoint where ``--resume`` would look, and a write that
fails (a full disk) removes what it wrote and leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from registry import VlframeError, one_line

STATE = "state.json"
STATE_TENSORS = "state.safetensors"
LEGACY_STATE = "state.pt"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
#: The folder of a run that holds its checkpoints.
FOLDER = "checkpoints"
#: The folder of a sharded checkpoint holding each rank's shards (:mod:`vlframe.runs.sharded`).
SHARDS = "sharded"


class CheckpointError(VlframeError):
    """A checkpoint that cannot be read (or is refused), or cannot be written."""


class DiskFullError(CheckpointError):
    """No space left where a checkpoint was being written."""


# -- RNG state ---------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # A machine with fewer GPUs than the one that saved (one GPU to debug on) takes the first ones.
        for index, gpu_state in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


# -- the state codec: JSON for structure, safetensors for tensors --------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON data; tensors and arrays go to ``tensors`` and are referred to by name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach().cpu().contiguous()
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in tensors.values()):
            tensor = tensor.clone()  # safetensors stores no two tensors sharing memory
        tensors[name] = tensor
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(value.astype(np.int64) if value.dtype == np.uint32 else value).contiguous()
        return {"__ndarray__": name, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's state")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(value["dtype"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _legacy_globals() -> list[Any]:
    """The numpy types an earlier version's ``state.pt`` holds (its numpy RNG state), and no more,
    under the module names of numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) alike."""
    core = getattr(np, "_core", None) or np.core
    reconstruct, uint32 = core.multiarray._reconstruct, type(np.dtype(np.uint32))
    named = [(reconstruct, f"{module}.multiarray._reconstruct") for module in ("numpy.core", "numpy._core")]
    named += [(uint32, f"numpy.dtypes.{uint32.__name__}")]
    return [*named, np.ndarray, np.dtype]


def read_state(path: Path) -> dict[str, Any]:
    """The state of checkpoint ``path``, read without running anything it holds.

    Raises :class:`CheckpointError` naming the file when it is unreadable, truncated, or (an
    earlier version's pickle) holds objects other than tensors, containers and numbers.
    """
    state_file = path / STATE
    if state_file.is_file():
        try:
            data = json.loads(state_file.read_text(encoding="utf-8"))
            tensors = load_file(str(path / STATE_TENSORS)) if (path / STATE_TENSORS).is_file() else {}
            state = _decode(data, tensors)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{state_file}: unreadable ({one_line(exc, hint=False)})") from None
        except Exception as exc:  # safetensors' own errors for a truncated file
            raise CheckpointError(f"{path / STATE_TENSORS}: unreadable ({one_line(exc, hint=False)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{state_file}: not a checkpoint state (a {type(state).__name__})")
        return state
    legacy = path / LEGACY_STATE
    import pickle

    try:
        with torch.serialization.safe_globals(_legacy_globals()):
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{legacy}: refused: {refusal(exc)}") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {STATE} (not a vlframe checkpoint)") from None
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
        raise CheckpointError(f"{legacy}: unreadable ({one_line(exc, hint=False)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{legacy}: not a checkpoint state (a {type(state).__name__})")
    return state


def refusal(exc: BaseException) -> str:
    """Why torch's safe unpickler refused a file, in one line."""
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    what = f"it holds {found.group(1)}, " if found else "it holds objects other than tensors and numbers, "
    return what + "which would run code when loaded; vlframe never unpickles such files"


# -- writing ---------------------------------------------------------------------------------------


def write(target: Path, model: nn.Module, state: dict[str, Any], files: dict[str, Path | str]) -> Path:
    """Write the checkpoint folder ``target`` in the whole format (``model.safetensors``),
    atomically, replacing one already there; return it. For converted and exported models.

    ``files`` maps names to copy in (paths) or to write (text), e.g. the config and tokenizer.
    A full disk is a :class:`DiskFullError` saying where and how much was needed; what was
    written is removed and the folder there before (if any) is left as it was.
    """
    tmp = temporary(target)
    try:
        save_model(model, str(tmp / WEIGHTS))  # handles tied weights (saved once)
        write_state(tmp, state)
        finish(tmp, target, files)
    except Exception as exc:  # OSError, or safetensors' own error for the same thing
        if no_space(exc):
            raise disk_full(target, checkpoint_size(model, state)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def temporary(target: Path) -> Path:
    """A new, empty folder beside ``target`` to write it in (``.step_000300.tmpPID``): renamed into
    place by :func:`finish` once whole, swept by :func:`sweep_partial` once its writer is gone."""
    tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def disk_full(target: Path, needed: int | None = None) -> DiskFullError:
    """The error of a write of ``target`` that found the disk full (``needed``: about how many bytes)."""
    need = f"it needs about {needed / 2**20:.0f} MiB, and " if needed else ""
    return DiskFullError(f"no space left on the device writing {target}: {need}"
                         f"{free_space(target.parent) / 2**20:.0f} MiB are free there; the checkpoints before it "
                         "are intact")


def finish(tmp: Path, target: Path, files: dict[str, Path | str]) -> None:
    """Add ``files`` (paths to copy, or text) to the temporary folder ``tmp``, then rename it to
    ``target`` (replacing one there): the last step of writing any checkpoint."""
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, tmp / name)
        else:
            (tmp / name).write_text(content, encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write ``state`` into ``folder`` as ``state.json`` + ``state.safetensors`` (its tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, tensors)
    save_file(tensors, str(folder / STATE_TENSORS))
    (folder / STATE).write_text(json.dumps(encoded, allow_nan=True), encoding="utf-8")


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full (an ``OSError``, or a library's error wrapping one)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "os error 28" in str(exc) \
        or "No space left on device" in str(exc)


def free_space(path: Path) -> int:
    """Bytes free on the file system holding ``path`` (or its nearest existing parent)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.is_dir():
            return shutil.disk_usage(folder).free
    return 0


def checkpoint_size(model: nn.Module, state: dict[str, Any]) -> int:
    """Bytes a checkpoint of ``model`` with ``state`` takes, roughly (weights + state tensors)."""
    seen: set[int] = set()
    total = 0
    for p in model.state_dict().values():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return total + walk(state)


def step_folder(directory: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` goes in a checkpoints folder: ``step_000300``."""
    return directory / f"step_{step:06d}"


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


# -- reading ---------------------------------------------------------------------------------------


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint folder (of this version or an earlier one)."""
    return (path / STATE).is_file() or (path / LEGACY_STATE).is_file()


def step_of(path: Path) -> int:
    """The step of a ``step_NNNNNN`` folder (-1 for another name)."""
    number = path.name.removeprefix("step_")
    return int(number) if number.isdigit() else -1


def candidates(path: Path) -> list[Path]:
    """The complete checkpoints at ``path`` (itself, or a run folder's), newest first."""
    if is_checkpoint(path):
        return [path]
    folder = path / FOLDER if (path / FOLDER).is_dir() else path
    return sorted((p for p in folder.glob("step_*") if step_of(p) >= 0 and is_checkpoint(p)), key=step_of,
                  reverse=True)


def find(path: Path) -> Path | None:
    """``path`` itself if it is a checkpoint, else the newest checkpoint in a run folder."""
    found = candidates(path)
    return found[0] if found else None


def check(path: Path) -> None:
    """Raise :class:`CheckpointError` unless checkpoint ``path`` looks whole: its JSON parses and
    its safetensors files' headers fit their sizes (a truncated file fails), without reading
    the tensors themselves. A sharded checkpoint has every shard file its state lists."""
    if not (path / STATE).is_file():
        read_state(path)  # an earlier version's state.pt: small, read whole
        state: Any = {}
    else:
        try:
            state = json.loads((path / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path / STATE}: unreadable ({one_line(exc, hint=False)})") from None
    files = [path / STATE_TENSORS] if (path / STATE).is_file() else []
    if (path / WEIGHTS).is_file() or not (path / SHARDS).is_dir():
        files.append(path / WEIGHTS)
    else:
        files += _shard_files(path, state)
    for file in files:
        _check_header(file)


def _shard_files(path: Path, state: Any) -> list[Path]:
    """The shard files of a sharded checkpoint, every one its state lists (a lost rank's file would
    leave its part of every tensor unread)."""
    files = sorted((path / SHARDS).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path / SHARDS}: no shard files")
    listed = state.get("shard_files") if isinstance(state, dict) else None
    missing = sorted(set(listed) - {f.name for f in files}) if isinstance(listed, list) else []
    if missing:
        raise CheckpointError(f"{path / SHARDS}: {len(missing)} of {len(listed)} shard files missing "
                              f"({', '.join(map(str, missing[:3]))})")
    return files


def _check_header(file: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            handle.keys()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: unreadable (the file is missing)") from None
    except Exception as exc:  # noqa: BLE001 - safetensors' errors for a truncated or foreign file
        raise CheckpointError(f"{file}: unreadable ({one_line(exc, hint=False)})") from None


def find_readable(path: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint at ``path`` whose weights and state can be read, and a line for each
    newer one passed over (truncated, corrupt) saying why."""
    passed: list[str] = []
    for ckpt in candidates(path):
        try:
            check(ckpt)
        except CheckpointError as exc:
            passed.append(f"{ckpt.name} skipped: {exc}")
            continue
        return ckpt, passed
    return None, passed


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = sorted((p for p in directory.glob("step_*") if step_of(p) >= 0 and is_checkpoint(p)), key=step_of)
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)

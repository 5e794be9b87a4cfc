"""The checkpointer: when the run's state is saved, how, and restoring it.

A checkpoint is ``<run>/checkpoints/step_NNNNNN/`` (:mod:`vlframe.runs.checkpoint`): the model and
optimiser written by the parallel strategy in its format, every ``Stateful`` part's entries in
``state.json`` (:mod:`vlframe.training.state`), the run's identity (tracking run id, config hash,
plugins), the resolved config and the tokenizer. It is written into a temporary folder on every
rank and renamed into place by rank 0 once whole, so a crash mid-save leaves the previous
checkpoint the newest complete one; a save that fails on any rank fails on all of them, with one
message, and keeps the checkpoints before it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from registry import ConfigError, Problem, VlframeError, in_one_line
from registry.protocols import ParallelStrategy
from vlframe.runs import checkpoint, formats
from vlframe.runtime import distributed
from vlframe.training.failures import NumericalError
from vlframe.training.state import Stateful


class Checkpointer:
    """Saves and restores a run: the model and optimiser through ``strategy``, the rest through ``parts``.

    ``files()`` names the files every checkpoint holds (the config, the tokenizer), ``identity()``
    the entries saying whose state it is (run id, config hash, plugins).
    """

    def __init__(self, folder: Path, strategy: ParallelStrategy, model: nn.Module, optimizer: torch.optim.Optimizer,
                 parts: Sequence[Stateful], *, every: int | None, keep: int,
                 files: Callable[[], Mapping[str, Path | str]], identity: Callable[[], Mapping[str, Any]]) -> None:
        self.folder, self.strategy, self.model, self.optimizer = folder, strategy, model, optimizer
        self.parts, self.every, self.keep = list(parts), every, keep
        self.files, self.identity = files, identity
        self.last_saved = -1

    def due(self, step: int, total: int) -> bool:
        """Whether ``step`` is a periodic checkpoint (the final one is saved anyway)."""
        return bool(self.every) and step % self.every == 0 and step < total

    def save(self, step: int, *, alone: bool = False) -> Path:
        """Checkpoint ``step``; the folder written. Every rank calls it, unless ``alone``: then rank 0
        writes without a collective (after an error on one rank, where the others may be anywhere;
        only for a strategy that does not save together)."""
        if alone and distributed.rank() != 0:
            return checkpoint.step_folder(self.folder, step)
        with distributed.local_only() if alone else contextlib.nullcontext():
            return self._save(step)

    def save_after(self, step: int, *, signalled: bool) -> Path | None:
        """After a signal (every rank got it, every rank is here) or an error (maybe on this rank
        alone): checkpoint the steps since the last checkpoint, where the strategy allows (one that
        saves together cannot after an error: the other ranks may be anywhere). Never raises: the
        first error is the one to report."""
        if step <= self.last_saved or step == 0 or not (signalled or not self.strategy.saves_together):
            return None
        try:
            return self.save(step, alone=not signalled)
        except Exception:  # noqa: BLE001 - see above
            return None

    def _save(self, step: int) -> Path:
        bad = self.strategy.nonfinite(self.model)  # the same list on every rank: all stop together
        if bad:  # never over the last good checkpoint
            raise NumericalError(f"step {step}: the weight {bad[0]} is not finite: not checkpointed")
        target = checkpoint.step_folder(self.folder, step)
        tmp = self._temporary(target)
        failure: BaseException | None = None
        try:
            entries = self.strategy.save(tmp, self.model, self.optimizer)
            if distributed.rank() == 0:
                state: dict[str, Any] = dict(entries)
                for part in self.parts:
                    state.update(part.state_dict())
                state.update(self.identity())
                checkpoint.write_state(tmp, state)
                checkpoint.finish(tmp, target, dict(self.files()))
        except Exception as exc:  # noqa: BLE001 - said below, once every rank knows
            failure = exc
        if distributed.any_rank(failure is not None):
            if distributed.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None and checkpoint.no_space(failure):
                raise checkpoint.disk_full(target, formats.local_bytes(self.model, self.optimizer)) from None
            if failure is not None:
                raise failure
            raise checkpoint.CheckpointError(f"writing {target} failed on another rank; the checkpoints before it "
                                             "are intact")
        if distributed.rank() == 0:
            checkpoint.prune(self.folder, self.keep)
        self.last_saved = step
        return target

    def _temporary(self, target: Path) -> Path:
        """Rank 0 makes the folder every rank writes in; every rank learns its name (or why not)."""
        name, problem = None, None
        if distributed.rank() == 0:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                checkpoint.sweep_partial(self.folder)  # a writer killed mid-save: free its space now
                name = checkpoint.temporary(target).name
            except OSError as exc:  # said on every rank: none is left waiting
                problem = f"cannot write {target}: {exc.strerror or exc}; the checkpoints before it are intact"
        name, problem = distributed.broadcast_object((name, problem))
        if problem is not None:
            raise checkpoint.CheckpointError(problem)
        return self.folder / str(name)

    def restore(self, ckpt: Path) -> dict[str, Any]:
        """Continue from ``ckpt``: the model, the optimiser and every part; its state."""
        try:
            state = checkpoint.read_state(ckpt)
            self.strategy.load(ckpt, self.model, self.optimizer, state)
        except KeyError as exc:
            raise VlframeError(f"--resume {ckpt}: not a training checkpoint (no {exc} state); to start from "
                               f"its weights use --set train.init_from={ckpt}") from None
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:  # torch's messages span lines
            raise VlframeError(f"--resume {ckpt}: cannot continue this config from it: {in_one_line(exc, 500)}") from exc
        try:
            for part in self.parts:
                part.load_state_dict(state)
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise VlframeError(f"--resume {ckpt}: its state is malformed ({type(exc).__name__}: "
                               f"{in_one_line(exc, 200)})") from None
        self.last_saved = int(state.get("step", -1))
        return state


def starting_point(resume: Path | None, init_from: Path | None, say: Callable[[str], None]) -> tuple[Path | None, Path | None]:
    """The checkpoint to resume from, or the weights to start from (fine-tuning), or neither; a
    truncated or corrupt newer checkpoint is passed over, saying so."""
    if resume is not None:
        ckpt, passed = checkpoint.find_readable(resume)
        if ckpt is None:
            why = f": {'; '.join(passed)}" if passed else ""
            raise VlframeError(f"--resume {resume}: no {'readable ' if passed else ''}checkpoint there{why}")
        for line in passed:
            say(f"note: {line}")
        return ckpt, None
    if init_from is not None:
        init, passed = checkpoint.find_readable(init_from)
        if init is None:
            why = "; ".join(passed) or (f"no checkpoint there (a step_* folder with {checkpoint.STATE}, "
                                        "or a run folder)")
            raise ConfigError([Problem("train.init_from", f"{init_from}: {why}")])
        for line in passed:
            say(f"note: {line}")
        return None, init
    return None, None


def initialise(init: Path, model: nn.Module, *, strict: bool, say: Callable[[str], None]) -> None:
    """Fine-tuning: start from ``init``'s weights (all of them, or with ``strict`` off those that fit)."""
    if strict:
        try:
            formats.load(init, model)
        except (ValueError, RuntimeError) as exc:  # torch's message spans lines: one problem, one line
            raise ConfigError([Problem("train.init_from", f"its weights do not fit the model ({in_one_line(exc, 400)}); "
                                                         "set train.init_strict: false to take those that fit")]) from None
        say(f"initialised from {init}")
        return

    def some(names: list[str]) -> str:
        return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""

    fresh, unused = formats.load_fitting(init, model)
    say(f"initialised from {init}: {len(fresh)} tensors of the model start fresh{some(fresh)}, "
        f"{len(unused)} of the checkpoint unused{some(unused)}")


__all__ = ["Checkpointer", "initialise", "starting_point"]

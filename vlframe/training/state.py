"""The run's state in ``Stateful`` parts (``state_dict`` / ``load_state_dict``), as torchtitan keeps it.

Each part owns its entries of a checkpoint's ``state.json`` (the names below), so checkpoints of
earlier versions load unchanged; the model and the optimiser are saved by the parallel strategy
(their format is its own), everything else here:

==================  ==========================================================================
``step``            :class:`TrainState`: optimiser steps taken
``rng``             :class:`RNGState`: Python's, numpy's and torch's generators (and CUDA's)
``scheduler``       :class:`SchedulerState`: the learning-rate schedule
``skipped``         the skip ledger (:class:`vlframe.data.loading.SkipLedger`): unusable samples
``samples``         :class:`DataPosition`: the samples of the steps completed
==================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from vlframe.runs import checkpoint


@runtime_checkable
class Stateful(Protocol):
    """What ``torch.distributed.checkpoint.stateful.Stateful`` declares, written here because
    importing that module pulls in ``torch._dynamo`` (half a second for every run)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Where the loop is: optimiser steps taken."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


class RNGState:
    """The random generators, so that a resumed run draws what the uninterrupted one would."""

    def state_dict(self) -> dict[str, Any]:
        return {"rng": checkpoint.rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        checkpoint.set_rng_state(state["rng"])


class SchedulerState:
    """The learning-rate schedule (a ``torch.optim.lr_scheduler`` object) under its entry."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])


@dataclass
class DataPosition:
    """How far the training data has been read: the samples of the steps completed (a step that
    failed half-way is read again). The loader restarts there, in micro-batches of the current
    size, so a run resumed with another ``grad_accum`` reads on from the same sample."""

    micro_batch: int  # samples per micro-batch over all ranks (batch_size / grad_accum)
    batch_size: int  # samples per step
    samples: int = 0

    def step_done(self) -> None:
        self.samples += self.batch_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches of the current size before the position (where the loader starts)."""
        return self.samples // self.micro_batch

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Checkpoints of earlier versions did not record it: steps x samples per step.
        self.samples = int(state.get("samples", int(state["step"]) * self.batch_size))


__all__ = ["DataPosition", "RNGState", "SchedulerState", "Stateful", "TrainState"]

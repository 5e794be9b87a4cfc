"""Replicas: the whole model on every rank, gradients averaged by DDP (``train.parallel: ddp``, the default).

In one process this is the single-process strategy: no process group, no wrapper, the model
itself. Under ``torchrun`` with several ranks the model is wrapped in PyTorch's
``DistributedDataParallel``. Checkpoints are whole (``model.safetensors``, written by rank 0),
so every command reads them and a run resumes at any world size, under any strategy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from registry import ComponentSpec, ParallelConfig, hookimpl
import vlframe.sdk as sdk


class ReplicateConfig(ParallelConfig):
    """Settings of ``ddp`` (none yet: DDP's own defaults)."""

    default: ClassVar[bool] = True  # the strategy of configs that name none


class SingleProcess:
    """One process, or every rank holding the whole model and acting alone (its base)."""

    shards = 1
    saves_together = False

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.notes: list[str] = []
        self.device: torch.device | None = None

    def setup(self) -> torch.device:
        self.device = sdk.setup_process_group(group=False)
        return self.device

    def parallelize(self, build: Callable[[str | None], nn.Module], prepare: Callable[[nn.Module], None], *,
                    device: torch.device, seed: int, precision: str) -> nn.Module:
        model = build(None)
        prepare(model)
        model.to(device)
        self.module = self._wrap(model)
        return model

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        yield

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float | None) -> Tensor:
        if max_norm is None:
            return nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return nn.utils.clip_grad_norm_(list(params), max_norm)

    def nonfinite(self, model: nn.Module) -> list[str]:
        # Replicas hold the same weights, so every rank finds the same names.
        return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]

    def evaluate(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 evaluates alone (its collectives off); the others wait for it."""
        result = None
        if sdk.rank() == 0:
            with sdk.local_only():
                result = fn()
        sdk.barrier()
        return result

    def save(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return sdk.save_whole(folder, model, optimizer) if sdk.rank() == 0 else {}

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             state: Mapping[str, Any]) -> None:
        sdk.load_checkpoint(folder, model, optimizer, dict(state))


class DataParallel(SingleProcess):
    """Several ranks, each a replica: PyTorch's ``DistributedDataParallel``."""

    def _wrap(self, model: nn.Module) -> nn.Module:
        self.notes.append(f"DDP: {sdk.world_size()} replicas")
        return nn.parallel.DistributedDataParallel(model)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        if last:
            yield
        else:
            with self.module.no_sync():  # reduce gradients once, after the last micro-batch
                yield


def replicate(config: ReplicateConfig) -> SingleProcess:
    """``ddp``: the single-process strategy alone, DDP when torchrun started several ranks."""
    return DataParallel() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else SingleProcess()


@hookimpl
def vlframe_parallel_strategies() -> list[ComponentSpec]:
    return [ComponentSpec("ddp", ReplicateConfig, replicate,
                          "Whole model on every rank (DistributedDataParallel under torchrun; plain in one process).")]

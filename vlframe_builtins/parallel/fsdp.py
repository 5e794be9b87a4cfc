"""Shards: FSDP2 (``torch.distributed.fsdp.fully_shard``), ``train.parallel: fsdp``.

Parameters, gradients and optimiser state are split over the ranks, per block the model names
(``blocks()``); the model is built on the meta device and each rank materialises only its
shards, so no rank ever holds it whole. Checkpoints are sharded (``torch.distributed.checkpoint``,
each rank its own files), resharded on load at any world size; ``vlframe export`` writes one
``model.safetensors`` from them.

Composition order, as torchtitan and open_clip do it: each block is compiled, then wrapped for
activation checkpointing (the trainer's ``prepare``), then sharded; the root is sharded last.
The capability methods (``encode_image``, ...) become FSDP forward methods, so evaluation can
call them on the sharded model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from registry import ComponentError, ComponentSpec, ParallelConfig, hookimpl
from registry.protocols import CAPABILITY_PROTOCOLS, capabilities_of, protocol_members
import vlframe.sdk as sdk


class FSDPConfig(ParallelConfig):
    """How ``fsdp`` shards the model."""

    changes_results: ClassVar[frozenset[str]] = frozenset({"param_dtype"})  # bfloat16 compute

    reshard_after_forward: bool = Field(
        True, description="Free each block's gathered parameters after its forward and gather them again for "
        "backward (ZeRO-3); false keeps them until backward (ZeRO-2: more memory, one all-gather less per block).")
    replicate: int = Field(
        1, gt=0, description="Hybrid sharding (HSDP): ranks form a (replicate x shard) mesh; each group of "
        "world/replicate ranks (e.g. one node) shards the model and the groups replicate it. 1: shard over all ranks.")
    param_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Dtype the gathered parameters compute in; gradients are reduced in float32. auto: "
        "bfloat16 on CUDA when train.precision resolves to bf16, else float32 (CPU ranks use autocast instead).")
    cpu_offload: bool = Field(
        False, description="Keep the sharded parameters, gradients and optimiser state in CPU memory, copied to "
        "the GPU block by block (FSDP2's CPUOffloadPolicy): fits larger models at the cost of speed. GPUs only.")


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _is_dtensor(t) else t


def device_mesh(device: torch.device, replicate: int) -> Any:
    """A 1-D mesh over every rank, or (replicate x shard) for hybrid sharding."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % replicate:
        raise ComponentError(f"train.parallel.replicate {replicate} does not divide the {world} rank(s)")
    if replicate == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def fully_shard_model(model: nn.Module, mesh: Any, *, reshard_after_forward: bool, param_dtype: torch.dtype | None,
                      cpu_offload: bool) -> int:
    """``fully_shard`` every block, then the root; return the number of FSDP units.

    0-dimensional parameters (a learned temperature) cannot be sharded: they stay whole on every
    rank (``ignored_params``) and :func:`sync_replicated_grads` averages their gradients.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    scalars = {p for p in model.parameters() if p.ndim == 0}
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    blocks = list(model.blocks())
    for block in blocks:
        own = {p for p in block.parameters() if p in scalars}
        fully_shard(block, reshard_after_forward=reshard_after_forward, ignored_params=own or None, **kwargs)
    # The root's parameters are needed again at once by backward: keep them gathered.
    fully_shard(model, reshard_after_forward=False, ignored_params=scalars or None, **kwargs)
    for capability in capabilities_of(model):
        protocol = CAPABILITY_PROTOCOLS.get(capability)
        for name in protocol_members(protocol) if protocol is not None else ():
            if callable(getattr(model, name, None)):
                register_fsdp_forward_method(model, name)
    return len(blocks) + 1


def materialise(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate a model built on the meta device (each rank its shards) and initialise it.

    Every module's ``reset_parameters()`` runs, children before parents (as construction does:
    a part's own initialisation overrides its layers' defaults). A parameter none of them
    initialised is an error naming it. Each shard draws from ``seed`` offset by its position in
    the shard dimension, so shards differ and replicas (hybrid sharding) agree.
    """
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
        for b in model.buffers():  # to_empty leaves them uninitialised: a reset must set them too
            if b.is_floating_point():
                b.fill_(math.nan)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            # DTensor warns that CPU meshes lack its offset-based RNG: each shard drawing from its own
            # seeded generator is what is wanted here.
            warnings.filterwarnings("ignore", message="DTensor random operators")
            sdk.reset_all_parameters(model)
    finally:
        torch.random.set_rng_state(state)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()]
               if p.is_floating_point() and bool(torch.isnan(_local(p)).any())]
    missing = sdk.gather_names(missing)
    if not missing and dist.get_world_size() > 1:  # whole (unsharded) parameters: rank 0's everywhere
        with torch.no_grad():
            for p in model.parameters():
                if not _is_dtensor(p):
                    dist.broadcast(p.data, src=0)
    if missing:
        owner = dict(model.named_modules())
        module = owner.get(missing[0].rpartition(".")[0], model)
        raise ComponentError(
            f"train.parallel: fsdp builds the model on the meta device, and no reset_parameters() initialised "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: give {type(module).__name__} (or a part "
            "above it) a reset_parameters() that initialises it, as its constructor does")


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients FSDP leaves alone (its ignored, whole parameters) over ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.parameters():
        if p.grad is not None and not _is_dtensor(p.grad):
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def grad_norm(params: Sequence[nn.Parameter]) -> Tensor:
    """The global gradient norm over sharded (DTensor) and whole gradients alike."""
    sharded = [p.grad for p in params if p.grad is not None and _is_dtensor(p.grad)]
    whole = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    total = torch.zeros((), dtype=torch.float32)
    if sharded:
        total = total + nn.utils.get_total_norm(sharded).full_tensor().float().cpu() ** 2
    if whole:
        total = total + nn.utils.get_total_norm(whole).float().cpu() ** 2
    return total.sqrt()


def param_dtype(setting: str, device: torch.device, precision: str) -> torch.dtype | None:
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "float32":
        return None
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else None


class FullyShard:
    """The model's parameters, gradients and optimiser state split over every rank (FSDP2)."""

    saves_together = True  # every rank writes its shards

    def __init__(self, config: FSDPConfig) -> None:
        self.config = config
        self.module: nn.Module | None = None
        self.notes: list[str] = []

    @property
    def shards(self) -> int:
        return max(1, sdk.world_size() // self.config.replicate)

    def setup(self) -> torch.device:
        device = sdk.setup_process_group(group=True)  # FSDP needs a group, even of one process
        if sdk.world_size() % self.config.replicate:
            raise ComponentError(f"train.parallel.replicate {self.config.replicate} does not divide the "
                                 f"{sdk.world_size()} rank(s)")
        if self.config.cpu_offload and device.type != "cuda":
            raise ComponentError("train.parallel.cpu_offload keeps shards in CPU memory for GPU ranks; these ranks "
                                 "already run on the CPU: set it false")
        return device

    def parallelize(self, build: Callable[[str | None], nn.Module], prepare: Callable[[nn.Module], None], *,
                    device: torch.device, seed: int, precision: str) -> nn.Module:
        model = build("meta")
        if not list(model.blocks()):  # the meta model is small to check: the blocks the contract names are the units
            raise ComponentError(f"train.parallel: fsdp shards per block, and {type(model).__name__}.blocks() names "
                                 "none: the whole model would be one unit (no memory saved)")
        prepare(model)
        cfg = self.config
        mesh = device_mesh(device, cfg.replicate)
        dtype = param_dtype(cfg.param_dtype, device, precision)
        units = fully_shard_model(model, mesh, reshard_after_forward=cfg.reshard_after_forward, param_dtype=dtype,
                                  cpu_offload=cfg.cpu_offload)
        shard_rank = mesh.get_local_rank("shard")
        materialise(model, torch.device("cpu") if cfg.cpu_offload else device, seed + 1000 * shard_rank)
        shape = "x".join(str(s) for s in mesh.shape)
        self.notes.append(f"FSDP2: {units} units on a {shape} mesh ({'hybrid' if cfg.replicate > 1 else 'fully sharded'}), "
                          f"parameters in {dtype or torch.float32}, gradients reduced in float32"
                          f"{', offloaded to the CPU' if cfg.cpu_offload else ''}")
        self.module = model
        return model

    @contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)
        yield

    def clip_grad_norm(self, params: Sequence[nn.Parameter], max_norm: float | None) -> Tensor:
        sync_replicated_grads(self.module)
        norm = grad_norm(params)
        if max_norm is not None:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            if coef < 1:
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.device))
        return norm

    def nonfinite(self, model: nn.Module) -> list[str]:
        local = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        return sdk.gather_names(local)  # each rank sees its shards only

    def evaluate(self, fn: Callable[[], Any]) -> Any:
        """Every rank evaluates in step (a sharded forward needs them all); rank 0 keeps the result."""
        with sdk.local_only():
            result = fn()
        sdk.barrier()
        return result if sdk.rank() == 0 else None

    def save(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        return sdk.save_sharded(folder, model, optimizer)

    def load(self, folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             state: Mapping[str, Any]) -> None:
        sdk.load_checkpoint(folder, model, optimizer, dict(state))


@hookimpl
def vlframe_parallel_strategies() -> list[ComponentSpec]:
    return [ComponentSpec("fsdp", FSDPConfig, FullyShard,
                          "Shard parameters, gradients and optimiser state over the ranks (FSDP2, per block; "
                          "sharded checkpoints).")]

"""How the model is spread over ranks: DDP replicas, or FSDP2 shards built from the meta device.

Both are PyTorch's own (``DistributedDataParallel``; ``torch.distributed.fsdp.fully_shard``). The
model is reached only through its contract: ``blocks()`` names the repeated blocks that become
FSDP units (and that activation checkpointing and ``torch.compile`` act on), the capability
methods (``encode_image``, ...) become FSDP forward methods, and every module's optional
``reset_parameters()`` initialises its weights on a model built on the meta device.

Composition order, as torchtitan and open_clip do it: each block is compiled, then wrapped for
activation checkpointing, then sharded; the root is sharded last.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from registry import ComponentError
from registry.protocols import CAPABILITY_PROTOCOLS, protocol_members

# Ops whose outputs selective activation checkpointing keeps (the expensive ones); everything
# else in a block (norms, activations, adds, softmax) is recomputed in backward.
_SAVED_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_cudnn_attention", "convolution")


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor"


# -- activation checkpointing and compile (per block) ----------------------------------------------


def _selective_context() -> tuple[Any, Any]:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, name).default for name in _SAVED_OPS if hasattr(torch.ops.aten, name)}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def checkpoint_blocks(model: nn.Module, mode: str) -> int:
    """Recompute each block's activations in backward (``full``), or all but its matmul and
    attention outputs (``selective``); return how many blocks. Inference (no grad) is untouched."""
    if mode == "none":
        return 0
    from torch.utils.checkpoint import checkpoint

    blocks = list(model.blocks())
    for block in blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            extra = {"context_fn": _selective_context} if mode == "selective" else {}
            return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = forward
    return len(blocks)


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each block in place (the same module objects, so sharding still finds them)."""
    blocks = list(model.blocks())
    for block in blocks:
        block.compile()
    return len(blocks)


# -- FSDP ------------------------------------------------------------------------------------------


def device_mesh(device: torch.device, replicate: int) -> Any:
    """A 1-D mesh over every rank, or (replicate x shard) for hybrid sharding."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % replicate:
        raise ComponentError(f"train.fsdp.replicate {replicate} does not divide the {world} rank(s)")
    if replicate == 1:
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))


def fully_shard_model(model: nn.Module, mesh: Any, *, reshard_after_forward: bool, param_dtype: torch.dtype | None,
                      cpu_offload: bool) -> int:
    """``fully_shard`` every block, then the root; return the number of FSDP units.

    0-dimensional parameters (a learned temperature) cannot be sharded: they stay whole on every
    rank (``ignored_params``) and :func:`sync_replicated_grads` averages their gradients.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

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
    from torch.distributed.fsdp import register_fsdp_forward_method

    for capability in getattr(model, "capabilities", frozenset()):
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
    import warnings

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # DTensor warns that CPU meshes lack its offset-based RNG: each shard drawing from its own
        # seeded generator is what is wanted here.
        warnings.filterwarnings("ignore", message="DTensor random operators")
        _reset_all(model, state)
    missing = [name for name, p in [*model.named_parameters(), *model.named_buffers()]
               if p.is_floating_point() and bool(torch.isnan(p.to_local() if _is_dtensor(p) else p).any())]
    missing = gather_names(missing)
    if not missing and dist.get_world_size() > 1:  # whole (unsharded) parameters: rank 0's everywhere
        with torch.no_grad():
            for p in model.parameters():
                if not _is_dtensor(p):
                    dist.broadcast(p.data, src=0)
    if missing:
        owner = dict(model.named_modules())
        first = missing[0]
        module = owner.get(first.rpartition(".")[0], model)
        raise ComponentError(
            f"train.parallel: fsdp builds the model on the meta device, and no reset_parameters() initialised "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: give {type(module).__name__} (or a part "
            "above it) a reset_parameters() that initialises it, as its constructor does")


def uninitialised(model: nn.Module) -> list[str]:
    """The parameters of a meta-built ``model`` that no ``reset_parameters()`` initialises (the
    model is materialised on the CPU, whole, for the check: for the conformance kit)."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    _reset_all(model, torch.random.get_rng_state())
    return [name for name, p in model.named_parameters() if bool(torch.isnan(p).any())]


def _reset_all(model: nn.Module, rng_state: Tensor) -> None:
    try:
        for module in reversed(list(model.modules())):
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                try:
                    reset()
                except Exception as exc:
                    raise ComponentError(f"{type(module).__name__}.reset_parameters() failed on the meta-built "
                                         f"model: {' '.join(str(exc).split())[:300]}") from exc
    finally:
        torch.random.set_rng_state(rng_state)


def gather_names(names: list[str]) -> list[str]:
    """The union of ``names`` over ranks, sorted (every rank gets the same list)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = [n for part in every for n in part]
    return sorted(set(names))


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients FSDP leaves alone (its ignored, whole parameters) over ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in model.parameters():
        if p.grad is not None and not _is_dtensor(p.grad):
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def grad_norm(params: list[nn.Parameter]) -> Tensor:
    """The global gradient norm over sharded (DTensor) and whole gradients alike."""
    sharded = [p.grad for p in params if p.grad is not None and _is_dtensor(p.grad)]
    whole = [p.grad for p in params if p.grad is not None and not _is_dtensor(p.grad)]
    total = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm = nn.utils.get_total_norm(sharded)
        total = total + norm.full_tensor().float().cpu() ** 2
    if whole:
        total = total + nn.utils.get_total_norm(whole).float().cpu() ** 2
    return total.sqrt()


def clip_grads(params: list[nn.Parameter], max_norm: float) -> Tensor:
    norm = grad_norm(params)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    if coef < 1:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm


# -- the model as the loop sees it ---------------------------------------------------------------


@dataclass
class Parallel:
    """The model spread over ranks: what to call, and the few steps that differ between strategies."""

    module: nn.Module  # call this for the training forward
    strategy: str  # "single", "ddp" or "fsdp"
    notes: list[str] = field(default_factory=list)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: reduce gradients only on the last."""
        if self.strategy == "ddp" and not last:
            with self.module.no_sync():
                yield
        elif self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def finish_backward(self) -> None:
        if self.sharded:
            sync_replicated_grads(self.module)

    def clip(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        """Clip to ``max_norm`` (when given); the norm before clipping."""
        if max_norm is None:
            return grad_norm(params) if self.sharded else nn.utils.get_total_norm([p.grad for p in params])
        return clip_grads(params, max_norm) if self.sharded else nn.utils.clip_grad_norm_(params, max_norm)


def fsdp_param_dtype(setting: str, device: torch.device, precision: str) -> torch.dtype | None:
    if setting == "bfloat16":
        return torch.bfloat16
    if setting == "float32":
        return None
    return torch.bfloat16 if device.type == "cuda" and precision == "bf16" else None


def spread(build: Callable[[str | None], nn.Module], train: Any, device: torch.device, *, world: int,
           precision: str, shard_coordinate: Callable[[Any], int] | None = None) -> tuple[nn.Module, Parallel]:
    """Build the model with ``build(device)`` and spread it as ``train`` says; return (model, parallel).

    ``model`` is the module whose parameters the optimiser steps (the sharded model itself under
    FSDP). Under FSDP the model is built on the meta device and no rank ever holds it whole.
    """
    notes: list[str] = []
    fsdp = train.parallel == "fsdp"
    if fsdp and not dist.is_initialized():
        raise ComponentError("train.parallel: fsdp needs a process group: start with torchrun "
                             "(torchrun --nproc_per_node N -m vlframe train ...; 1 is allowed)")
    if fsdp and train.fsdp.cpu_offload and device.type != "cuda":
        raise ComponentError("train.fsdp.cpu_offload keeps shards in CPU memory for GPU ranks; these ranks "
                             "already run on the CPU: set it false")
    model = build("meta" if fsdp else None)
    if fsdp:  # the meta model is small to check: the blocks the contract names are the units
        if not list(model.blocks()):
            raise ComponentError(f"train.parallel: fsdp shards per block, and {type(model).__name__}.blocks() "
                                 "names none: the whole model would be one unit (no memory saved)")
    if train.compile:
        count = compile_blocks(model)
        notes.append(f"torch.compile: {count} blocks, compiled during the first step")
    if train.activation_checkpointing != "none":
        count = checkpoint_blocks(model, train.activation_checkpointing)
        notes.append(f"activation checkpointing ({train.activation_checkpointing}) on {count} blocks")
    if not fsdp:
        model.to(device)
        wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        return model, Parallel(wrapped, "ddp" if world > 1 else "single", notes)
    mesh = device_mesh(device, train.fsdp.replicate)
    param_dtype = fsdp_param_dtype(train.fsdp.param_dtype, device, precision)
    units = fully_shard_model(model, mesh, reshard_after_forward=train.fsdp.reshard_after_forward,
                              param_dtype=param_dtype, cpu_offload=train.fsdp.cpu_offload)
    shard_rank = mesh.get_local_rank("shard")
    materialise(model, torch.device("cpu") if train.fsdp.cpu_offload else device, train.seed + 1000 * shard_rank)
    shape = "x".join(str(s) for s in mesh.shape)
    notes.append(f"FSDP2: {units} units on a {shape} mesh ({'hybrid' if train.fsdp.replicate > 1 else 'fully sharded'}), "
                 f"parameters in {param_dtype or torch.float32}, gradients reduced in float32"
                 f"{', offloaded to the CPU' if train.fsdp.cpu_offload else ''}")
    return model, Parallel(model, "fsdp", notes)


__all__ = ["Parallel", "checkpoint_blocks", "compile_blocks", "fully_shard_model", "materialise", "spread"]

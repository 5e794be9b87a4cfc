"""What is done to each of a model's repeated blocks before a parallel strategy wraps it:
``torch.compile`` and activation checkpointing.

The model names its blocks (``blocks()``, the contract). Composition order, as torchtitan and
open_clip do it: each block is compiled, then wrapped for activation checkpointing, and only then
handed to the strategy (replicated or sharded); the blocks stay the same module objects, so a
strategy that shards per block still finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Ops whose outputs selective activation checkpointing keeps (the expensive ones); everything
# else in a block (norms, activations, adds, softmax) is recomputed in backward.
_SAVED_OPS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_cudnn_attention", "convolution")


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
    from vlframe.runtime.compiling import key_caches_by_isa

    key_caches_by_isa()
    blocks = list(model.blocks())
    for block in blocks:
        block.compile()
    return len(blocks)


def prepare_blocks(model: nn.Module, *, compile: bool, activation_checkpointing: str) -> list[str]:
    """Compile, then checkpoint, the blocks as ``train`` says; lines saying what was done."""
    notes = []
    if compile:
        notes.append(f"torch.compile: {compile_blocks(model)} blocks, compiled during the first step")
    if activation_checkpointing != "none":
        count = checkpoint_blocks(model, activation_checkpointing)
        notes.append(f"activation checkpointing ({activation_checkpointing}) on {count} blocks")
    return notes


__all__ = ["checkpoint_blocks", "compile_blocks", "prepare_blocks"]

"""Optimiser and learning-rate schedule from a :class:`~vlframe.config.root.TrainConfig`."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlframe.config.root import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter but those the model names in ``no_weight_decay()`` (biases,
    norms, position embeddings, class and query tokens, a temperature: the model says which)."""
    spared = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # a tied weight appears once
        if param.requires_grad:
            (no_decay if name in spared else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        # torch's Adafactor (factored second moments, no first moment): the paper's optimiser family.
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    # fused: one kernel for the whole update, without the foreach path's temporaries.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine, linear or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))

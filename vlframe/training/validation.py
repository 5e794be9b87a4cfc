"""Validation during training: the losses on the validation split, and the periodic tasks.

The losses come from the model's own forward (the objectives, on every validation batch); the
rest goes through the evaluation dispatcher, exactly as ``vlframe eval`` runs it, on the model in
memory: every task in ``train.val_tasks``, or by default every registered periodic task the
model can run (retrieval, for a contrastive model). Where it runs (rank 0 while the others wait,
or every rank in step) is the parallel strategy's to say.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from registry import ConfigError, Problem, Registry
from registry.protocols import ParallelStrategy, capabilities_of, why_not
from vlframe.config.root import VlframeConfig
from vlframe.data.loading import Collate, ImageTextSource, build_transform, eval_loader, is_streaming
from vlframe.evaluation.tasks import periodic_tasks, run_task
from vlframe.inference.trained import Trained
from vlframe.runs.folder import RunDir
from vlframe.runtime.precision import autocast


class Validator:
    """Validates the model being trained, where ``strategy`` says; metrics on rank 0."""

    def __init__(self, config: VlframeConfig, registry: Registry, model: nn.Module, val_data: Any, *,
                 strategy: ParallelStrategy, device: torch.device, precision: str) -> None:
        self.config, self.registry, self.model, self.strategy = config, registry, model, strategy
        if val_data is not None and is_streaming(val_data):
            raise ConfigError([Problem("data.val", "a streaming dataset cannot be evaluated (evaluation reads each "
                                                   "sample once, by index): validate on local shards (indexed) or "
                                                   "another dataset")])
        self.val_data, self.device, self.precision = val_data, device, precision
        capabilities = capabilities_of(model)
        wanted = config.train.val_tasks
        self.tasks = periodic_tasks(registry.catalog, capabilities) if wanted is None else dict(wanted)
        #: Periodic tasks this model cannot run, with the reason (recorded with the run).
        self.skipped = {} if wanted is not None else {
            name: why for name, task in periodic_tasks(registry.catalog, None).items()
            if (why := why_not(type(task).requires, capabilities))}
        problems = [Problem(f"train.val_tasks.{name}", f"task '{task.type}' cannot run on this model: {why}")
                    for name, task in self.tasks.items() if (why := why_not(type(task).requires, capabilities))]
        if problems:
            raise ConfigError(problems)

    def __call__(self, step: int, *, run: RunDir, run_id: str | None, tokenizer: Any) -> dict[str, float]:
        """The validation metrics at ``step`` (on rank 0; empty elsewhere, and without validation data)."""
        if self.val_data is None:
            return {}
        return self.strategy.evaluate(lambda: self._evaluate(step, run, run_id, tokenizer)) or {}

    @torch.no_grad()
    def _evaluate(self, step: int, run: RunDir, run_id: str | None, tokenizer: Any) -> dict[str, float]:
        self.model.eval()
        try:
            metrics = self._losses(tokenizer)
            trained = Trained(self.model, tokenizer, self.config, self.registry, self.device, self.precision,
                              run=run, run_id=run_id, step=step)
            for name, task in self.tasks.items():
                result = run_task(trained, task, name=name, dataset=self.val_data)
                metrics.update({f"val/{name}/{k}": v for k, v in result.metrics.items()})
        finally:
            self.model.train()
        return metrics

    def _losses(self, tokenizer: Any) -> dict[str, float]:
        cfg = self.config
        source = ImageTextSource(self.val_data, build_transform(cfg.data, self.model.image_size, train=False),
                                 seed=cfg.train.seed, random_caption=False)
        collate = Collate(tokenizer, self.model.context_length)
        loader = eval_loader(source, collate, cfg.data, batch=max(1, cfg.train.batch_size // cfg.train.grad_accum))
        totals: dict[str, float] = defaultdict(float)
        count = 0
        with autocast(self.precision, self.device):
            for batch in loader:
                out = self.model(batch.images.to(self.device), batch.text.to(self.device), batch.text_mask.to(self.device))
                n = len(batch.keys)
                totals["val/loss"] += out.loss.item() * n
                for name, value in out.losses.items():
                    totals[f"val/loss_{name}"] += value.item() * n
                count += n
        return {k: v / max(count, 1) for k, v in totals.items()}

"""Classification probes (the paper's frozen-feature protocol): a linear classifier on the mean of
the image tokens, or an attentional pooler (one learned query) plus a linear classifier. With
``finetune`` the image tower is trained too, at its own learning rate, on a copy (the loaded
model is left as it was). The pooler and the classifier are the registry's ``attentional``
pooler and ``linear`` head, built like a model's own parts."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_model
from torch import Tensor, nn

from registry import Capability, ComponentSpec, Kind, TaskConfig, hookimpl
from vlframe.sdk import EvalResult, Sample, TaskContext, Trained, batched, describe, labelled_images, topk_accuracy


class ProbeTaskConfig(TaskConfig):
    requires: ClassVar[frozenset[str]] = frozenset({Capability.IMAGE_TOKENS})
    train_data: str | dict[str, Any] | None = Field(
        None, description="A separate training set (as data); default: split data per class.")
    limit: int | None = Field(None, gt=0, description="Use N evenly spaced images of each set (every class stays in).")
    head: Literal["linear", "attentional"] = Field(
        "linear", description="linear: on the mean of the image tokens; attentional: a 1-query attentional pooler first.")
    finetune: bool = Field(False, description="Train the image tower too (default: frozen features).")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="Learning rate of the head.")
    encoder_lr: float = Field(1e-5, gt=0, description="finetune: learning rate of the image tower.")
    weight_decay: float = Field(1e-4, ge=0)
    heads: int = Field(4, gt=0, description="attentional: attention heads of the pooler.")
    train_fraction: float = Field(
        0.5, gt=0, lt=1, description="Without a separate training set: the share of each class used to train.")
    seed: int = 0


class ProbeHead(nn.Module):
    """Image tokens ``(B, N, D)`` -> class logits, through the catalog's pooler and linear head."""

    def __init__(self, trained: Trained, cfg: ProbeTaskConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        catalog = trained.registry.catalog
        self.pool = None
        if cfg.head == "attentional":
            pooler = catalog.validate(catalog.get(Kind.POOLER, "attentional").spec.config,
                                      {"type": "attentional", "n_query": 1, "heads": cfg.heads})
            self.pool = catalog.build(Kind.POOLER, pooler, path="probe.pooler", in_dim=in_dim, out_dim=in_dim)
        self.norm = nn.LayerNorm(in_dim)
        linear = catalog.validate(catalog.get(Kind.HEAD, "linear").spec.config, {"type": "linear", "bias": True})
        self.head = catalog.build(Kind.HEAD, linear, path="probe.head", in_dim=in_dim, out_dim=num_classes, tie_to=None)

    def forward(self, tokens: Tensor) -> Tensor:
        pooled = self.pool(tokens).mean(dim=1) if self.pool is not None else tokens.mean(dim=1)
        return self.head(self.norm(pooled))


def split_by_class(labels: Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a per-class split: ``fraction`` of each class to train (at least one), the rest to test."""
    rng = random.Random(seed)
    train, test = [], []
    for label in sorted(set(labels.tolist())):
        members = [i for i, y in enumerate(labels.tolist()) if y == label]
        rng.shuffle(members)
        cut = min(len(members) - 1, max(1, round(fraction * len(members)))) if len(members) > 1 else 1
        train += members[:cut]
        test += members[cut:]
    return sorted(train), sorted(test)


def fit(parameters: list[dict[str, Any]], loss_of_batch: Any, n: int, cfg: Any) -> list[float]:
    """AdamW over random mini-batches of ``n`` examples for ``cfg.steps`` steps; the loss history."""
    optimizer = torch.optim.AdamW(parameters, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.steps):
        index = torch.randperm(n, generator=generator)[: cfg.batch_size]
        loss = loss_of_batch(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _images(trained: Trained, samples: Sequence[Sample]) -> Tensor:
    return torch.cat([trained.load_images([s.image for s in b]) for b in batched(iter(samples), 64)])


@torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
def _frozen_tokens(trained: Trained, images: Tensor, batch: int = 64) -> Tensor:
    with trained.autocast():
        return torch.cat([trained.model.image_tokens(images[i : i + batch]).float() for i in range(0, len(images), batch)])


class ProbeTask:
    def __init__(self, cfg: ProbeTaskConfig) -> None:
        self.cfg = cfg

    def run(self, context: TaskContext) -> EvalResult:
        cfg, trained = self.cfg, context.trained
        torch.manual_seed(cfg.seed)
        dataset = context.dataset(cfg.data)
        train_dataset = context.dataset(cfg.train_data, split="train") if cfg.train_data is not None else None
        samples, labels = labelled_images(dataset, limit=cfg.limit)
        if train_dataset is not None:
            if getattr(train_dataset, "classes", None) != getattr(dataset, "classes", None):
                raise ValueError(f"the training set's classes ({describe(train_dataset)}) differ from the test "
                                 f"set's ({describe(dataset)}): labels would not correspond")
            train_samples, train_labels = labelled_images(train_dataset, limit=cfg.limit)
            test_samples, test_labels = samples, labels
        else:
            train_idx, test_idx = split_by_class(labels, cfg.train_fraction, cfg.seed)
            if not test_idx:
                raise ValueError("every class has a single image: nothing left to test on (pass a training set)")
            train_samples, train_labels = [samples[i] for i in train_idx], labels[train_idx]
            test_samples, test_labels = [samples[i] for i in test_idx], labels[test_idx]
        num_classes = int(max(labels.max(), train_labels.max())) + 1
        classes = getattr(dataset, "classes", None) or [str(i) for i in range(num_classes)]
        device = trained.device
        train_images, test_images = _images(trained, train_samples), _images(trained, test_samples)
        train_labels, test_labels = train_labels.to(device), test_labels.to(device)
        head = ProbeHead(trained, cfg, trained.model.image_token_dim, num_classes).to(device)

        if not cfg.finetune:
            train_x, test_x = _frozen_tokens(trained, train_images), _frozen_tokens(trained, test_images)

            def loss_of_batch(index: Tensor) -> Tensor:
                return F.cross_entropy(head(train_x[index]), train_labels[index])

            losses = fit([{"params": head.parameters(), "lr": cfg.lr}], loss_of_batch, len(train_x), cfg)
            with torch.no_grad():
                test_logits, train_logits = head(test_x), head(train_x)
        else:
            tower = copy.deepcopy(trained.model.image_tower()).train()

            def loss_of_batch(index: Tensor) -> Tensor:
                with trained.autocast():
                    logits = head(tower(train_images[index]).float())
                return F.cross_entropy(logits.float(), train_labels[index])

            losses = fit([{"params": head.parameters(), "lr": cfg.lr},
                          {"params": tower.parameters(), "lr": cfg.encoder_lr}], loss_of_batch, len(train_images), cfg)
            tower.eval()
            with torch.no_grad(), trained.autocast():
                test_logits = torch.cat([head(tower(test_images[i : i + 64]).float())
                                         for i in range(0, len(test_images), 64)])
                train_logits = torch.cat([head(tower(train_images[i : i + 64]).float())
                                          for i in range(0, len(train_images), 64)])
        metrics = {k: 100.0 * v for k, v in topk_accuracy(test_logits.float(), test_labels).items()}
        metrics["train_top1"] = 100.0 * topk_accuracy(train_logits.float(), train_labels, ks=(1,))["top1"]
        result = EvalResult("probe", metrics, {
            "head": cfg.head, "finetune": cfg.finetune, "train_images": len(train_samples),
            "test_images": len(test_samples), "classes": len(classes), "steps": cfg.steps,
            "first_loss": losses[0], "last_loss": losses[-1]})
        if context.out_dir is not None:
            out = context.out_dir
            out.mkdir(parents=True, exist_ok=True)
            save_model(head, str(out / "probe_head.safetensors"))
            (out / "classes.json").write_text(json.dumps(list(classes)), encoding="utf-8")
            result.files += [out / "probe_head.safetensors", out / "classes.json"]
        return result


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("probe", ProbeTaskConfig, ProbeTask,
                          "Classification probe on the image tokens: linear or attentional, frozen or fine-tuned.")]

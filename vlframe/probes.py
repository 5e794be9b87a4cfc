"""Heads trained on a trained model: image classification probes and multimodal understanding.

- **Probes** (the paper's frozen-feature protocol): a linear classifier on the mean of the image
  encoder's tokens, or an attentional pooler (one learned query) plus a linear classifier. With
  ``finetune`` the encoder is trained too, at its own learning rate (on a copy: the loaded model
  is left as it was).
- **Multimodal understanding**: a classifier on the multimodal decoder's states for (image,
  text) -> label tasks (VQA / SNLI-VE style), trained from JSONL rows
  ``{"image": ..., "text": ..., "label": ...}``. :func:`write_match_pairs` derives such a task
  from any captioned dataset: does this caption belong to this image?

The pooler and heads are built through the registry's catalog (``attentional`` pooler,
``linear`` and ``mlp`` heads), like the model's own parts.
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_model
from torch import Tensor, nn

from registry import ConfigModel, Kind
from vlframe.datasets import Sample, load_image
from vlframe.evaluation import EvalResult, batched, describe, iter_samples, labelled_images
from vlframe.pretrained import Trained
from vlframe.zeroshot import topk_accuracy


class ProbeConfig(ConfigModel):
    """How a classification head is trained on a trained model's image encoder."""

    head: Literal["linear", "attentional"] = Field(
        "linear", description="linear: on the mean of the image tokens; attentional: a 1-query attentional pooler first.")
    finetune: bool = Field(False, description="Train the image encoder too (default: frozen features).")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0, description="Learning rate of the head.")
    encoder_lr: float = Field(1e-5, gt=0, description="finetune: learning rate of the image encoder.")
    weight_decay: float = Field(1e-4, ge=0)
    heads: int = Field(4, gt=0, description="attentional: attention heads of the pooler.")
    train_fraction: float = Field(
        0.5, gt=0, lt=1, description="Without a separate training set: the share of each class used to train.")
    seed: int = 0


class ProbeHead(nn.Module):
    """Image tokens ``(B, N, D)`` -> class logits, through the catalog's pooler and linear head."""

    def __init__(self, trained: Trained, cfg: ProbeConfig, in_dim: int, num_classes: int) -> None:
        super().__init__()
        catalog = trained.registry.catalog
        self.pool = None
        if cfg.head == "attentional":
            pooler = catalog.get(Kind.POOLER, "attentional").spec.config
            self.pool = catalog.build(Kind.POOLER, pooler(type="attentional", n_query=1, heads=cfg.heads),
                                      path="probe.pooler", in_dim=in_dim, out_dim=in_dim)
        self.norm = nn.LayerNorm(in_dim)
        linear = catalog.get(Kind.HEAD, "linear").spec.config
        self.head = catalog.build(Kind.HEAD, linear(type="linear", bias=True), path="probe.head", in_dim=in_dim,
                                  out_dim=num_classes, tie_to=None)

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


def _images(trained: Trained, samples: Sequence[Sample]) -> Tensor:
    return torch.cat([trained.load_images([s.image for s in b]) for b in batched(iter(samples), 64)])


@torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
def _frozen_tokens(trained: Trained, images: Tensor, batch: int = 64) -> Tensor:
    with trained.autocast():
        return torch.cat([trained.model.image_tokens(images[i : i + batch]).float() for i in range(0, len(images), batch)])


def _fit(parameters: list[dict[str, Any]], loss_of_batch: Any, n: int, cfg: Any) -> list[float]:
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


def evaluate_probe(trained: Trained, dataset: Any, *, train_dataset: Any = None, cfg: ProbeConfig | None = None,
                   limit: int | None = None, out_dir: Path | None = None) -> EvalResult:
    """Train a classification probe on labelled images; top-1/top-5 on the held-out images."""
    cfg = cfg or ProbeConfig()
    torch.manual_seed(cfg.seed)
    samples, labels = labelled_images(dataset, limit=limit)
    if train_dataset is not None:
        if getattr(train_dataset, "classes", None) != getattr(dataset, "classes", None):
            raise ValueError(f"the training set's classes ({describe(train_dataset)}) differ from the test set's "
                             f"({describe(dataset)}): labels would not correspond")
        train_samples, train_labels = labelled_images(train_dataset, limit=limit)
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
    width = trained.model.image_encoder.width
    head = ProbeHead(trained, cfg, width, num_classes).to(device)

    if not cfg.finetune:
        train_x, test_x = _frozen_tokens(trained, train_images), _frozen_tokens(trained, test_images)

        def loss_of_batch(index: Tensor) -> Tensor:
            return F.cross_entropy(head(train_x[index]), train_labels[index])

        losses = _fit([{"params": head.parameters(), "lr": cfg.lr}], loss_of_batch, len(train_x), cfg)
        with torch.no_grad():
            test_logits, train_logits = head(test_x), head(train_x)
    else:
        encoder = copy.deepcopy(trained.model.image_encoder).train()

        def loss_of_batch(index: Tensor) -> Tensor:
            with trained.autocast():
                logits = head(encoder(train_images[index]).float())
            return F.cross_entropy(logits.float(), train_labels[index])

        losses = _fit([{"params": head.parameters(), "lr": cfg.lr},
                       {"params": encoder.parameters(), "lr": cfg.encoder_lr}], loss_of_batch, len(train_images), cfg)
        encoder.eval()
        with torch.no_grad(), trained.autocast():
            test_logits = torch.cat([head(encoder(test_images[i : i + 64]).float()) for i in range(0, len(test_images), 64)])
            train_logits = torch.cat([head(encoder(train_images[i : i + 64]).float())
                                      for i in range(0, len(train_images), 64)])
    test_acc = topk_accuracy(test_logits.float(), test_labels)
    metrics = {k: 100.0 * v for k, v in test_acc.items()}
    metrics["train_top1"] = 100.0 * topk_accuracy(train_logits.float(), train_labels, ks=(1,))["top1"]
    result = EvalResult("probe", metrics, {
        "head": cfg.head, "finetune": cfg.finetune, "train_images": len(train_samples), "test_images": len(test_samples),
        "classes": len(classes), "steps": cfg.steps, "first_loss": losses[0], "last_loss": losses[-1]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(head, str(out_dir / "probe_head.safetensors"))
        (out_dir / "classes.json").write_text(json.dumps(list(classes)), encoding="utf-8")
        result.files += [out_dir / "probe_head.safetensors", out_dir / "classes.json"]
    return result


# -- multimodal understanding --------------------------------------------------------------


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """JSONL rows ``{"image", "text", "label"}``; image paths are relative to the file's folder."""
    rows = []
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image, text, label = row["image"], row["text"], row["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{number}: not a JSON object with image, text and label ({exc})") from None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{number}: empty text")
            rows.append({"image": Path(path).parent / image, "text": text, "label": str(label), "line": number})
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


@torch.no_grad()  # not inference_mode, under which autocast re-casts the weights at every call
def multimodal_features(trained: Trained, rows: Sequence[dict[str, Any]], batch_size: int = 32) -> Tensor:
    """Mean of the multimodal decoder's states over each text's real tokens: ``(N, width)``."""
    out = []
    for i in range(0, len(rows), batch_size):
        part = rows[i : i + batch_size]
        images = trained.load_images([load_image(r["image"], f"{r['image']} (line {r['line']})") for r in part])
        ids, mask = trained.tokenize([r["text"] for r in part])
        with trained.autocast():
            states, mask = trained.model.multimodal_states(images, ids, mask)
        weights = mask.unsqueeze(-1).to(states.dtype)
        out.append(((states * weights).sum(1) / weights.sum(1).clamp_min(1)).float())
    return torch.cat(out)


class UnderstandingConfig(ConfigModel):
    """How the multimodal-understanding classifier is trained (on frozen multimodal features)."""

    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden_dim: int | None = Field(None, gt=0, description="Hidden size of the MLP head; default the decoder width.")
    seed: int = 0


def evaluate_understanding(trained: Trained, train_file: Path, test_file: Path, *,
                           cfg: UnderstandingConfig | None = None, out_dir: Path | None = None) -> EvalResult:
    """Train an MLP head on (image, text) -> label from ``train_file``; accuracy on ``test_file``."""
    cfg = cfg or UnderstandingConfig()
    torch.manual_seed(cfg.seed)
    train_rows, test_rows = read_pairs(train_file), read_pairs(test_file)
    labels = sorted({r["label"] for r in train_rows})
    unknown = sorted({r["label"] for r in test_rows} - set(labels))
    if unknown:
        raise ValueError(f"{test_file}: labels {unknown[:5]} never occur in {train_file}")
    index = {label: i for i, label in enumerate(labels)}
    device = trained.device
    train_x, test_x = multimodal_features(trained, train_rows), multimodal_features(trained, test_rows)
    train_y = torch.tensor([index[r["label"]] for r in train_rows], device=device)
    test_y = torch.tensor([index[r["label"]] for r in test_rows], device=device)
    catalog = trained.registry.catalog
    mlp = catalog.get(Kind.HEAD, "mlp").spec.config(type="mlp", hidden_dim=cfg.hidden_dim)
    head = nn.Sequential(nn.LayerNorm(train_x.shape[1]),
                         catalog.build(Kind.HEAD, mlp, path="understanding.head", in_dim=train_x.shape[1],
                                       out_dim=len(labels), tie_to=None)).to(device)
    losses = _fit([{"params": head.parameters(), "lr": cfg.lr}],
                  lambda i: F.cross_entropy(head(train_x[i]), train_y[i]), len(train_x), cfg)
    with torch.no_grad():
        accuracy = (head(test_x).argmax(-1) == test_y).float().mean().item()
        train_accuracy = (head(train_x).argmax(-1) == train_y).float().mean().item()
    # The best constant answer a head could learn from the training rows alone.
    majority = (test_y == torch.bincount(train_y, minlength=len(labels)).argmax()).float().mean().item()
    result = EvalResult("understanding", {"accuracy": 100.0 * accuracy, "train_accuracy": 100.0 * train_accuracy,
                                          "majority_baseline": 100.0 * majority},
                        {"labels": labels, "train_rows": len(train_rows), "test_rows": len(test_rows),
                         "first_loss": losses[0], "last_loss": losses[-1]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_model(head, str(out_dir / "understanding_head.safetensors"))
        (out_dir / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
        result.files += [out_dir / "understanding_head.safetensors", out_dir / "labels.json"]
    return result


def write_match_pairs(dataset: Any, out_dir: Path, *, limit: int | None = None, seed: int = 0) -> Path:
    """Derive a matching task from a captioned dataset: every image once with one of its own
    captions (label ``yes``) and once with a caption of another image (``no``).

    Writes the images (PNG) and ``pairs.jsonl`` into ``out_dir``; returns the JSONL path.
    """
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples = list(iter_samples(dataset, limit))
    if len(samples) < 2:
        raise ValueError("a matching task needs at least two images")
    lines = []
    for i, sample in enumerate(samples):
        name = f"images/{i:06d}.png"
        sample.image.save(out_dir / name)
        lines.append({"image": name, "text": rng.choice(sample.captions), "label": "yes", "source": sample.key})
        for _ in range(20):  # a caption of another image, unless every try says the same as this one's
            other = samples[(i + rng.randrange(1, len(samples))) % len(samples)]
            other_caption = rng.choice(other.captions)
            if other_caption not in sample.captions:
                lines.append({"image": name, "text": other_caption, "label": "no", "source": sample.key})
                break
    rng.shuffle(lines)
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path

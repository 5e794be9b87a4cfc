"""Multimodal understanding: a classifier on the multimodal decoder's states for (image, text) ->
label tasks (VQA / SNLI-VE style), trained on frozen features from JSONL rows
``{"image": ..., "text": ..., "label": ...}`` (``vlframe data match-pairs`` derives such a task,
does this caption belong to this image, from any captioned dataset)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import save_model
from torch import Tensor, nn

from registry import Capability, ComponentSpec, ExistingFile, Kind, TaskConfig, hookimpl
from vlframe.sdk import EvalResult, TaskContext, Trained, load_image

from vlframe_builtins.tasks.probe import fit


class UnderstandingTaskConfig(TaskConfig):
    requires: ClassVar[frozenset[str]] = frozenset({Capability.MULTIMODAL_STATES})
    data: ExistingFile = Field(description="The test rows: JSONL of {image, text, label} (image paths relative to it).")
    train_data: ExistingFile = Field(description="The training rows, in the same form.")
    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden_dim: int | None = Field(None, gt=0, description="Hidden size of the MLP head; default the decoder width.")
    seed: int = 0


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
    """Mean of the multimodal states over each text's real tokens: ``(N, width)``."""
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


class UnderstandingTask:
    def __init__(self, cfg: UnderstandingTaskConfig) -> None:
        self.cfg = cfg

    def run(self, context: TaskContext) -> EvalResult:
        cfg, trained = self.cfg, context.trained
        torch.manual_seed(cfg.seed)
        train_rows, test_rows = read_pairs(cfg.train_data), read_pairs(cfg.data)
        labels = sorted({r["label"] for r in train_rows})
        unknown = sorted({r["label"] for r in test_rows} - set(labels))
        if unknown:
            raise ValueError(f"{cfg.data}: labels {unknown[:5]} never occur in {cfg.train_data}")
        index = {label: i for i, label in enumerate(labels)}
        device = trained.device
        train_x, test_x = multimodal_features(trained, train_rows), multimodal_features(trained, test_rows)
        train_y = torch.tensor([index[r["label"]] for r in train_rows], device=device)
        test_y = torch.tensor([index[r["label"]] for r in test_rows], device=device)
        catalog = trained.registry.catalog
        mlp = catalog.validate(catalog.get(Kind.HEAD, "mlp").spec.config, {"type": "mlp", "hidden_dim": cfg.hidden_dim})
        head = nn.Sequential(nn.LayerNorm(train_x.shape[1]),
                             catalog.build(Kind.HEAD, mlp, path="understanding.head", in_dim=train_x.shape[1],
                                           out_dim=len(labels), tie_to=None)).to(device)
        losses = fit([{"params": head.parameters(), "lr": cfg.lr}],
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
        if context.out_dir is not None:
            out = context.out_dir
            out.mkdir(parents=True, exist_ok=True)
            save_model(head, str(out / "understanding_head.safetensors"))
            (out / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
            result.files += [out / "understanding_head.safetensors", out / "labels.json"]
        return result


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("understanding", UnderstandingTaskConfig, UnderstandingTask,
                          "An MLP on multimodal states for (image, text) -> label rows (JSONL); accuracy.",
                          example=None)]

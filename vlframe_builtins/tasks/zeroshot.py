"""Zero-shot classification: a text classifier from class names x prompt templates (CLIP's
recipe), top-1/top-5 accuracy on a labelled image set (an ImageFolder, or synthetic scenes
labelled by an attribute)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field, field_validator

from registry import Capability, ComponentSpec, TaskConfig, hookimpl
from vlframe.sdk import (
    PROMPT_TEMPLATES,
    EvalResult,
    TaskContext,
    batched,
    classify,
    describe,
    labelled_images,
    topk_accuracy,
    zero_shot_classifier,
)


class ZeroShotTaskConfig(TaskConfig):
    requires: ClassVar[frozenset[str]] = frozenset({Capability.CONTRASTIVE})
    templates: list[str] | None = Field(
        None, description="Prompt templates with {} for the class name, or a file of them, one per line; "
        "default: a 12-template ensemble.")
    limit: int | None = Field(None, gt=0, description="Use N evenly spaced images (every class stays in).")
    batch_size: int = Field(64, gt=0, description="Images embedded together.")

    @field_validator("templates", mode="before")
    @classmethod
    def _read_file(cls, value: object) -> object:
        if isinstance(value, (str, Path)):
            path = Path(value)
            if not path.is_file():
                raise ValueError(f"templates: no such file: {path}")
            return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return value

    @field_validator("templates")
    @classmethod
    def _with_slot(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None:
            if not templates:
                raise ValueError("no prompt templates")
            bad = [t for t in templates if "{}" not in t]
            if bad:
                raise ValueError(f"prompt template(s) without '{{}}' for the class name: {bad}")
        return templates


class ZeroShotTask:
    def __init__(self, cfg: ZeroShotTaskConfig) -> None:
        self.cfg = cfg

    def run(self, context: TaskContext) -> EvalResult:
        cfg, trained = self.cfg, context.trained
        dataset = context.dataset(cfg.data)
        classes = getattr(dataset, "classes", None)
        if not classes:
            raise ValueError("zero-shot needs a dataset with class names (an ImageFolder folder: --data DIR)")
        templates = list(cfg.templates or PROMPT_TEMPLATES)
        classifier = zero_shot_classifier(trained.embed_texts, classes, templates)
        samples, labels = labelled_images(dataset, limit=cfg.limit)
        embeds = torch.cat([trained.embed_images(trained.load_images([s.image for s in batch]))
                            for batch in batched(iter(samples), cfg.batch_size)])
        accuracy = topk_accuracy(classify(embeds, classifier.to(embeds.device)), labels.to(embeds.device))
        return EvalResult("zeroshot", {k: 100.0 * v for k, v in accuracy.items()},
                          {"data": describe(dataset), "images": len(samples), "classes": len(classes),
                           "templates": len(templates)})


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("zeroshot", ZeroShotTaskConfig, ZeroShotTask,
                          "Zero-shot classification from class names and prompt templates; top-1/top-5.")]

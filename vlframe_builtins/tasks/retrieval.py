"""Retrieval: image->text and text->image recall@1/5/10 with all of each image's captions (the
COCO / Flickr protocol). Periodic: it runs at every validation of a contrastive model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from registry import Capability, ComponentSpec, TaskConfig, hookimpl
from vlframe.sdk import EvalResult, TaskContext, describe, embed_dataset, retrieval_recall


class RetrievalTaskConfig(TaskConfig):
    requires: ClassVar[frozenset[str]] = frozenset({Capability.CONTRASTIVE})
    periodic: ClassVar[bool] = True
    limit: int | None = Field(None, gt=0, description="Use only the first N images (and all their captions).")
    batch_size: int = Field(64, gt=0, description="Images embedded together.")


class RetrievalTask:
    def __init__(self, cfg: RetrievalTaskConfig) -> None:
        self.cfg = cfg

    def run(self, context: TaskContext) -> EvalResult:
        dataset = context.dataset(self.cfg.data)
        skipped: list[str] = []
        images, texts, owners, keys, _ = embed_dataset(context.trained, dataset, limit=self.cfg.limit,
                                                       batch_size=self.cfg.batch_size, skipped=skipped)
        metrics = retrieval_recall(images, texts, owners.to(images.device))
        return EvalResult("retrieval", metrics, {"data": describe(dataset), "images": len(keys),
                                                 "captions": len(owners), "skipped": len(skipped)})


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("retrieval", RetrievalTaskConfig, RetrievalTask,
                          "Image-text retrieval recall@1/5/10 both ways, every caption of each image.")]

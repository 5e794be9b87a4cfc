"""Retrieval: image->text and text->image recall@1/5/10 with all of each image's captions (the
COCO / Flickr protocol). Periodic: it runs at every validation of a contrastive model."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from registry import Capability, ComponentSpec, TaskConfig, hookimpl
from vlframe.sdk import EvalResult, TaskContext, describe, embed_dataset, recall_from_ranks, retrieval_ranks


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
        i2t, t2i = retrieval_ranks(images, texts, owners.to(images.device))
        metrics = recall_from_ranks(i2t, t2i)
        # Per query, for compare's paired bootstrap: an image by its key, a caption by its image's
        # key and its place among that image's captions.
        image_keys = _unique(keys)
        place: dict[int, int] = {}
        caption_keys = []
        for owner in owners.tolist():
            place[owner] = place.get(owner, -1) + 1
            caption_keys.append(f"{image_keys[owner]}#{place[owner]}")
        items = {}
        for k in (1, 5, 10):
            items[f"i2t_r{k}"] = {key: 100.0 * (r < k) for key, r in zip(image_keys, i2t.tolist())}
            items[f"t2i_r{k}"] = {key: 100.0 * (r < k) for key, r in zip(caption_keys, t2i.tolist())}
        return EvalResult("retrieval", metrics, {"data": describe(dataset), "images": len(keys),
                                                 "captions": len(owners), "skipped": len(skipped)}, items=items)


def _unique(keys: list[str]) -> list[str]:
    """The keys, a repeated one suffixed with its position (a dataset may repeat an image)."""
    seen: set[str] = set()
    out = []
    for i, key in enumerate(keys):
        out.append(key if key not in seen else f"{key}@{i}")
        seen.add(out[-1])
    return out


@hookimpl
def vlframe_tasks() -> list[ComponentSpec]:
    return [ComponentSpec("retrieval", RetrievalTaskConfig, RetrievalTask,
                          "Image-text retrieval recall@1/5/10 both ways, every caption of each image.")]

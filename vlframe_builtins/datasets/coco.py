"""The COCO captions format: ``captions_*.json`` (``images``, ``annotations``) and an image folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from registry import ComponentSpec, DatasetConfig, ExistingDir, ExistingFile, hookimpl, one_line
from vlframe.sdk import FileDataset


class CocoConfig(DatasetConfig):
    annotations: ExistingFile = Field(description="A captions_*.json file.")
    images: ExistingDir = Field(description="The folder holding its images (file_name is relative to it).")
    limit: int | None = Field(None, gt=0, description="Use only the first N images (quick trials).")

    @classmethod
    def from_path(cls, path: Path) -> dict[str, Any] | None:
        """A ``captions_*.json`` file, with its images in the folder named after it:
        ``annotations/captions_val2017.json`` -> ``val2017/`` beside ``annotations/`` (or beside the file)."""
        if not (path.is_file() and path.suffix.lower() == ".json"):
            return None
        name = path.stem.removeprefix("captions_")
        for images in (path.parent.parent / name, path.parent / name):
            if images.is_dir():
                return {"type": "coco", "annotations": str(path), "images": str(images)}
        raise ValueError(f"COCO images for {path.name} not found in {path.parent.parent / name}; "
                         "write a dataset YAML (type: coco, annotations, images)")


def build(cfg: CocoConfig, *, split: str) -> FileDataset:
    try:
        data = json.loads(cfg.annotations.read_text(encoding="utf-8"))
        images = {img["id"]: img["file_name"] for img in data["images"]}
        captions: dict[int, list[str]] = {image_id: [] for image_id in images}
        for ann in data["annotations"]:
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{cfg.annotations}: not a COCO captions file ({one_line(exc, hint=False)})") from None
    entries = [(cfg.images / images[i], captions[i]) for i in sorted(images)]
    if cfg.limit is not None:
        entries = entries[: cfg.limit]
    return FileDataset(entries, f"COCO {cfg.annotations.name} ({split})")


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [ComponentSpec("coco", CocoConfig, build, "COCO captions JSON with its image folder.")]

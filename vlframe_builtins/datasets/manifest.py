"""Image-caption manifests: JSONL (one image and its captions per line) or CSV (image, caption).

JSONL, the layout of Flickr8k here::

    {"image": "images/1000268201_693b08cb0e.jpg", "captions": ["A child in a pink dress ...", ...]}

CSV has a header row; rows naming the same image are grouped, and a caption cell may hold
several captions separated by ``caption_separator``. Image paths are relative to
``image_root`` (default: the manifest's folder).
"""

from __future__ import annotations

import csv
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from registry import ComponentSpec, DatasetConfig, ExistingFile, hookimpl
from vlframe.sdk import FileDataset


class ManifestConfig(DatasetConfig):
    path: ExistingFile = Field(description="The manifest file (.jsonl or .csv).")
    image_root: Path | None = Field(None, description="Folder image paths are relative to; default the manifest's.")
    format: Literal["auto", "jsonl", "csv"] = "auto"
    image_key: str = "image"
    caption_key: str = Field("captions", description="JSONL: a string or list of strings; CSV: a column.")
    caption_separator: str | None = Field(None, description="CSV only: split a caption cell on this string.")
    limit: int | None = Field(None, gt=0, description="Use only the first N images (quick trials).")

    @classmethod
    def from_path(cls, path: Path) -> dict[str, Any] | None:
        """A ``.jsonl`` or ``.csv`` manifest file."""
        if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
            return {"type": "manifest", "path": str(path)}
        return None


def _lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file; a line that is not UTF-8 is an error naming it."""
    out = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                out.append((number, raw.decode("utf-8")))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                 f"{exc.start + 1}); manifests are UTF-8") from None
    return out


def _read_jsonl(cfg: ManifestConfig) -> list[tuple[str, list[str]]]:
    rows = []
    for number, line in _lines(cfg.path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image = record[cfg.image_key]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{cfg.path}:{number}: not a JSON object with '{cfg.image_key}': {exc}") from None
        captions = record.get(cfg.caption_key, [])
        if isinstance(captions, str):
            captions = [captions]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"{cfg.path}:{number}: '{cfg.caption_key}' must be a string or a list of strings, "
                             f"got {json.dumps(captions)[:80]}")
        if not isinstance(image, str):
            raise ValueError(f"{cfg.path}:{number}: '{cfg.image_key}' must be a path (a string), "
                             f"got {json.dumps(image)[:80]}")
        rows.append((image, captions))
    return rows


def _read_csv(cfg: ManifestConfig) -> list[tuple[str, list[str]]]:
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    text = "".join(line for _, line in _lines(cfg.path))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = {cfg.image_key, cfg.caption_key} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{cfg.path}: no column {', '.join(sorted(missing))}; columns: {reader.fieldnames}")
    for row in reader:
        cell = row[cfg.caption_key] or ""
        parts = cell.split(cfg.caption_separator) if cfg.caption_separator else [cell]
        grouped.setdefault(row[cfg.image_key], []).extend(parts)
    return list(grouped.items())


def build(cfg: ManifestConfig, *, split: str) -> FileDataset:
    fmt = cfg.format if cfg.format != "auto" else ("csv" if cfg.path.suffix.lower() == ".csv" else "jsonl")
    rows = _read_csv(cfg) if fmt == "csv" else _read_jsonl(cfg)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    root = cfg.image_root or cfg.path.parent
    return FileDataset([(root / image, captions) for image, captions in rows], f"{cfg.path} ({split})")


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [ComponentSpec("manifest", ManifestConfig, build, "JSONL or CSV manifest of image paths and captions.")]

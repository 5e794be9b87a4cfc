"""Classification images in the ImageFolder layout, for zero-shot evaluation.

The layout (that of ``../shared/data/imagenette`` and of torchvision's ``ImageFolder``)::

    root/
        classes.json            optional: {"chain_saw": "chain saw", "tench": "tench", ...}
        chain_saw/
            ILSVRC2012_val_00004262.jpg
            ...
        tench/
            ...

Each subfolder of ``root`` holding at least one image file is a class. Classes are ordered by
folder name (plain string order, as ``sorted()`` and torchvision order them, so ``French_horn``
comes before ``cassette_player``) and a sample's label is its class's index. Only the files
directly inside a class folder are read, those whose extension is in ``extensions``
(case-insensitive), in name order; other files, hidden files and folders (``.name``) and
subfolders without images are ignored (the last are named by ``describe()``).

A class's name, as it should appear in a prompt, comes from ``class_names`` (a JSON object
mapping every class folder to its name; default ``root/classes.json`` when present), or else
from the folder name with ``_`` read as a space. Each sample's one caption is that name, and
``meta["label"]`` its label.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from registry import ComponentSpec, DatasetConfig, ExistingDir, ExistingFile, hookimpl, one_line
from vlframe.sdk import FileDataset, Sample, load_image

#: Image extensions read by default (compared lower-cased).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: The class-name file looked for in ``root`` when ``class_names`` is not given.
CLASSES_FILE = "classes.json"


class ImageFolderConfig(DatasetConfig):
    root: ExistingDir = Field(description="Folder holding one subfolder of images per class.")
    class_names: ExistingFile | None = Field(
        None,
        description="JSON object mapping each class folder to its name in prompts; "
        "default root/classes.json if present, else folder names with '_' as spaces.",
    )
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, min_length=1,
                                        description="File extensions read as images (case-insensitive).")
    limit_per_class: int | None = Field(None, gt=0, description="Use only the first N images of each class.")

    @classmethod
    def from_path(cls, path: Path) -> dict[str, Any] | None:
        """A folder with at least one class subfolder holding images."""
        if path.is_dir() and _list_folders(path, IMAGE_EXTENSIONS)[0]:
            return {"type": "imagefolder", "root": str(path)}
        return None

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for ext in value:
            ext = ext.strip().lower()
            if not ext.strip("."):
                raise ValueError(f"empty extension in {list(value)}")
            out.append(ext if ext.startswith(".") else "." + ext)
        return tuple(dict.fromkeys(out))


def _list_folders(root: Path, extensions: tuple[str, ...]) -> tuple[dict[str, list[Path]], list[str]]:
    """Class folders with their image files (sorted), and the non-hidden folders without images."""
    found: dict[str, list[Path]] = {}
    empty: list[str] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            f for f in folder.iterdir()
            if not f.name.startswith(".") and f.suffix.lower() in extensions and not f.is_dir()
        )
        if files:
            found[folder.name] = files
        else:
            empty.append(folder.name)
    return found, empty


def _read_class_names(path: Path, folders: list[str], empty: list[str]) -> list[str]:
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read class names ({one_line(exc, hint=False)})") from None
    if not isinstance(mapping, dict):
        raise ValueError(f"{path}: expected a JSON object mapping class folder -> class name, "
                         f"got {type(mapping).__name__}")
    bad = sorted(k for k, v in mapping.items() if not isinstance(v, str) or not v.strip())
    if bad:
        raise ValueError(f"{path}: class name is not a non-empty string for folder(s) {', '.join(bad)}")
    problems = []
    unknown = sorted(set(mapping) - set(folders))
    if unknown:
        no_images = [k for k in unknown if k in empty]
        missing = [k for k in unknown if k not in empty]
        if missing:
            problems.append(f"names folder(s) not in {path.parent}: {', '.join(missing)}")
        if no_images:
            problems.append(f"names folder(s) with no image: {', '.join(no_images)}")
    unnamed = [f for f in folders if f not in mapping]
    if unnamed:
        problems.append(f"misses class folder(s) {', '.join(unnamed)}")
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)}")
    return [mapping[f].strip() for f in folders]


class ImageFolderDataset(FileDataset):
    """Map-style dataset over an ImageFolder tree; ``classes[label]`` is a class's prompt name.

    ``folders[label]`` is its folder name, ``labels[i]`` the label of entry ``i``. Entries whose
    file has gone (a broken link) are set aside in ``skipped``; a corrupt image raises
    :class:`~vlframe.datasets.SampleError` when read.
    """

    def __init__(self, cfg: ImageFolderConfig, split: str = "val") -> None:
        root = cfg.root
        by_folder, self.empty_folders = _list_folders(root, cfg.extensions)
        if not by_folder:
            raise ValueError(
                f"{root}: no class folder holding images ({', '.join(cfg.extensions)}); "
                "expected the ImageFolder layout root/CLASS/*.jpg"
            )
        self.folders: list[str] = list(by_folder)
        names_file = cfg.class_names
        if names_file is None and (root / CLASSES_FILE).is_file():
            names_file = root / CLASSES_FILE
        self.class_names_file: Path | None = names_file
        if names_file is not None:
            self.classes: list[str] = _read_class_names(names_file, self.folders, self.empty_folders)
        else:
            self.classes = [f.replace("_", " ").strip() or f for f in self.folders]
        label_of: dict[Path, int] = {}
        entries: list[tuple[Path, list[str]]] = []
        for label, folder in enumerate(self.folders):
            files = by_folder[folder][: cfg.limit_per_class]
            for path in files:
                label_of[path] = label
                entries.append((path, [self.classes[label]]))
        super().__init__(entries, f"ImageFolder {root} ({split})")
        self.labels: list[int] = [label_of[path] for path, _ in self.entries]

    def __getitem__(self, index: int) -> Sample:
        path, captions = self.entries[index]
        return Sample(load_image(path), list(captions), str(path), {"label": self.labels[index]})

    def describe(self) -> str:
        parts = [f"{len(self.classes)} classes"]
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.empty_folders:
            parts.append(f"folder(s) without images ignored: {', '.join(self.empty_folders)}")
        dupes = sorted(name for name, n in Counter(self.classes).items() if n > 1)
        if dupes:
            parts.append(f"class names shared by several folders: {', '.join(dupes)}")
        return f"{self.description}: {len(self.entries)} images, {'; '.join(parts)}"


def build(cfg: ImageFolderConfig, *, split: str) -> ImageFolderDataset:
    return ImageFolderDataset(cfg, split)


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [ComponentSpec("imagefolder", ImageFolderConfig, build,
                          "ImageFolder classification images (root/CLASS/*.jpg) with class names.")]

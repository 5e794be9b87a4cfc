"""The ImageFolder dataset plugin on real files written by PIL (and on Imagenette when present)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from vlframe_builtins.datasets import imagefolder
from vlframe_builtins.datasets.imagefolder import ImageFolderConfig, ImageFolderDataset
from registry import BuildError, Kind, Registry
from vlframe.data.samples import SampleError

from conftest import ROOT

IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"
NAMES = {"cat_kind": "tabby cat", "dog": "dog", "red_fox": "red fox"}


def _image(path: Path, color: tuple[int, int, int], size=(20, 12), fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


def make_tree(root: Path, classes_json: dict | None = NAMES) -> Path:
    _image(root / "cat_kind" / "a.png", (200, 0, 0))
    _image(root / "cat_kind" / "b.JPG", (0, 200, 0), fmt="JPEG")  # upper-case extension
    _image(root / "cat_kind" / "c.jpeg", (0, 0, 200))
    (root / "cat_kind" / "notes.txt").write_text("not an image, ignored")
    _image(root / "dog" / "0.jpg", (10, 10, 10))
    _image(root / "dog" / "1.jpg", (20, 20, 20))
    (root / "dog" / "bad.jpg").write_bytes(b"\xff\xd8 this is no JPEG")  # corrupt
    _image(root / "red_fox" / "x.png", (250, 120, 0), size=(8, 8))
    _image(root / ".cache" / "hidden.png", (1, 2, 3))  # hidden folder: ignored
    (root / "empty").mkdir()  # no image: not a class
    if classes_json is not None:
        (root / "classes.json").write_text(json.dumps(classes_json))
    return root


def load(split: str = "val", **data) -> ImageFolderDataset:
    return imagefolder.build(ImageFolderConfig(type="imagefolder", **data), split=split)


def test_classes_labels_captions_and_a_corrupt_image(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    ds = load(root=root)
    assert ds.folders == ["cat_kind", "dog", "red_fox"]
    assert ds.classes == ["tabby cat", "dog", "red fox"]
    assert ds.class_names_file == root / "classes.json"
    assert [Path(p).name for p, _ in ds.entries] == ["a.png", "b.JPG", "c.jpeg", "0.jpg", "1.jpg", "bad.jpg", "x.png"]
    assert ds.labels == [0, 0, 0, 1, 1, 1, 2] and len(ds) == 7 and ds.skipped == []
    first = ds[0]
    assert first.captions == ["tabby cat"] and first.meta == {"label": 0}
    assert first.key == str(root / "cat_kind" / "a.png")
    assert first.image.mode == "RGB" and first.image.size == (20, 12) and first.image.getpixel((0, 0)) == (200, 0, 0)
    fox = ds[6]
    assert (fox.captions, fox.meta, fox.image.size) == (["red fox"], {"label": 2}, (8, 8))
    assert ds[1].captions == ["tabby cat"] and ds[4].meta == {"label": 1}
    with pytest.raises(SampleError, match="cannot decode image") as info:
        ds[5]
    assert info.value.key == str(root / "dog" / "bad.jpg")
    assert list(ds.captions()) == ["tabby cat"] * 3 + ["dog"] * 3 + ["red fox"]
    assert ds.describe() == f"ImageFolder {root} (val): 7 images, 3 classes; folder(s) without images ignored: empty"


def test_limit_per_class_extensions_and_folder_names(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data", classes_json=None)
    ds = load(root=root, limit_per_class=2)
    assert ds.classes == ["cat kind", "dog", "red fox"]  # folder names with '_' as a space
    assert ds.class_names_file is None
    assert ds.labels == [0, 0, 1, 1, 2]
    assert [Path(p).name for p, _ in ds.entries] == ["a.png", "b.JPG", "0.jpg", "1.jpg", "x.png"]
    png = load(root=root, extensions=["PNG"])  # no dot, upper case: normalised
    assert png.folders == ["cat_kind", "red_fox"] and png.labels == [0, 1]
    assert png.describe().endswith("folder(s) without images ignored: dog, empty")
    # plain string order, as torchvision's: upper case before lower case
    _image(root / "Zebra_stripe" / "z.png", (0, 0, 0))
    assert load(root=root).classes[0] == "Zebra stripe"
    with pytest.raises(ValidationError, match="greater than 0"):
        load(root=root, limit_per_class=0)


def test_a_broken_link_is_skipped(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    os.symlink(tmp_path / "gone.jpg", root / "dog" / "2.jpg")
    ds = load(root=root)
    assert [(e.key, e.reason) for e in ds.skipped] == [(str(root / "dog" / "2.jpg"), "file not found")]
    assert len(ds) == len(ds.labels) == 7 and ds.labels == [0, 0, 0, 1, 1, 1, 2]
    assert "7 images, 3 classes; 1 skipped" in ds.describe()


def test_class_names_file_errors(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    names = root / "classes.json"
    names.write_text(json.dumps({"cat_kind": "cat", "dog": "dog"}))
    with pytest.raises(ValueError, match=r"classes.json: misses class folder\(s\) red_fox") as info:
        load(root=root)
    assert str(names) in str(info.value)
    names.write_text(json.dumps({**NAMES, "wolf": "wolf", "zebra": "zebra"}))
    with pytest.raises(ValueError, match=r"classes.json: names folder\(s\) not in .*: wolf, zebra"):
        load(root=root)
    names.write_text(json.dumps({"cat_kind": "cat", "wolf": "wolf"}))
    with pytest.raises(ValueError, match=r"names folder\(s\) not in .*: wolf; misses class folder\(s\) dog, red_fox"):
        load(root=root)
    names.write_text(json.dumps(NAMES))
    with pytest.raises(ValueError, match=r"names folder\(s\) with no image: dog"):
        load(root=root, extensions=[".png"])
    names.write_text(json.dumps({**NAMES, "dog": ""}))
    with pytest.raises(ValueError, match=r"class name is not a non-empty string for folder\(s\) dog"):
        load(root=root)
    names.write_text('["tabby cat", "dog"]')
    with pytest.raises(ValueError, match="expected a JSON object"):
        load(root=root)
    names.write_text("{not json")
    with pytest.raises(ValueError, match=r"classes.json: cannot read class names \(JSONDecodeError"):
        load(root=root)
    # an explicit file wins over root/classes.json
    other = tmp_path / "names.json"
    other.write_text(json.dumps({"cat_kind": "kitten", "dog": "puppy", "red_fox": "fox"}))
    assert load(root=root, class_names=other).classes == ["kitten", "puppy", "fox"]
    with pytest.raises(ValidationError, match="file not found"):
        load(root=root, class_names=tmp_path / "missing.json")


def test_empty_or_missing_root(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "readme.txt").write_text("x")
    _image(tmp_path / "empty" / "loose.jpg", (0, 0, 0))  # not in a class folder
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no class folder holding images"):
        load(root=tmp_path / "empty")
    with pytest.raises(ValidationError, match="folder not found"):
        load(root=tmp_path / "nowhere")


def test_through_a_registry(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "data")
    registry = Registry.discover(autoload=False, plugins=[imagefolder])
    entry = registry.catalog.get(Kind.DATASET, "imagefolder")
    config = registry.validate(entry.spec.config, {"type": "imagefolder", "root": str(root), "limit_per_class": 1})
    ds = registry.catalog.build(Kind.DATASET, config, split="train")
    assert ds.labels == [0, 1, 2] and ds[2].captions == ["red fox"]
    assert ds.describe().startswith(f"ImageFolder {root} (train): 3 images")
    with pytest.raises(ValidationError, match="extra"):
        registry.validate(entry.spec.config, {"type": "imagefolder", "root": str(root), "limit": 1})
    (root / "classes.json").write_text(json.dumps({"dog": "dog"}))
    with pytest.raises(BuildError, match=r"dataset 'imagefolder'.*misses class folder\(s\) cat_kind, red_fox"):
        registry.catalog.build(Kind.DATASET, config, split="train")


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"{IMAGENETTE} is not on this machine")
def test_real_imagenette() -> None:
    ds = load(root=IMAGENETTE)
    assert len(ds.classes) == 10 and len(ds) == 400 and not ds.skipped
    assert Counter(ds.labels) == {label: 40 for label in range(10)}
    assert "chain saw" in ds.classes and "English springer" in ds.classes
    label = ds.classes.index("chain saw")
    assert ds.folders[label] == "chain_saw"
    sample = ds[ds.labels.index(label)]
    assert sample.captions == ["chain saw"] and sample.meta == {"label": label}
    assert sample.image.size == (128, 128) and sample.image.mode == "RGB"
    assert len(load(root=IMAGENETTE, limit_per_class=3)) == 30

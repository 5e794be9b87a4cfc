"""The built-in synthetic dataset, built through the real registry, checked on real renders."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from registry import Kind, Registry
from vlframe.data.samples import Sample

GRID = {  # position word -> (row, column) of its 3x3 cell
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
# Rough references chosen here, independently of the plugin's palette: a rendered pixel must be
# nearer to its named colour than to any other.
REFERENCE_RGB = {
    "red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "yellow": (255, 220, 0),
    "purple": (128, 0, 160), "orange": (255, 128, 0), "black": (0, 0, 0),
}
COUNTS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.discover()


def build(reg: Registry, split: str = "train", **fields: Any):
    entry = reg.catalog.get(Kind.DATASET, "synthetic")
    cfg = reg.validate(entry.spec.config, {"type": "synthetic", "size": 64, "val_size": 16, **fields})
    return entry.spec.factory(cfg, split=split)


def mentions(caption: str, phrase: str) -> bool:
    """``phrase`` as whole words; a bare "top" must not be satisfied by "top left"."""
    return re.search(rf"\b{re.escape(phrase)}\b(?! (left|right)\b)", caption) is not None


def test_registered_by_its_plugin_with_one_line_summary(reg: Registry) -> None:
    entry = reg.catalog.get(Kind.DATASET, "synthetic")
    assert entry.plugin == "datasets.synthetic"
    assert entry.spec.summary.strip() and "\n" not in entry.spec.summary


def test_samples_have_the_promised_shape(reg: Registry) -> None:
    ds = build(reg, image_size=96, captions_per_image=4)
    assert len(ds) == 64 and len(build(reg, "val")) == 16
    for i in (0, 7, 63):
        sample = ds[i]
        assert isinstance(sample, Sample)
        assert sample.image.mode == "RGB" and sample.image.size == (96, 96)
        assert sample.key == f"synthetic/train/{i}"
        assert len(sample.captions) == 4 and len(set(sample.captions)) == 4  # distinct paraphrases
        for caption in sample.captions:
            assert caption == caption.lower() and caption.endswith(".")
        for obj in sample.meta["objects"]:
            assert set(obj) == {"shape", "color", "size", "position"}


def test_out_of_range_index_raises_index_error(reg: Registry) -> None:
    ds = build(reg)
    for bad in (64, 1000, -1):
        with pytest.raises(IndexError):
            ds[bad]
    assert len(list(ds)) == 64  # so plain iteration stops at the end of the split


def test_same_config_gives_identical_samples_in_any_access_order(reg: Registry) -> None:
    first, second = build(reg, seed=3), build(reg, seed=3)
    forward = {i: first[i] for i in (0, 5, 17, 40)}
    backward = {i: second[i] for i in (40, 17, 5, 0, 5)}
    for i, sample in forward.items():
        assert sample.image.tobytes() == backward[i].image.tobytes()
        assert sample.captions == backward[i].captions
        assert sample.meta == backward[i].meta


def test_seed_and_split_change_the_scenes(reg: Registry) -> None:
    base = build(reg)
    for other in (build(reg, "val"), build(reg, seed=1)):
        images_differ = [base[i].image.tobytes() != other[i].image.tobytes() for i in range(16)]
        captions_differ = [base[i].captions != other[i].captions for i in range(16)]
        assert all(images_differ)
        assert sum(captions_differ) >= 12  # a one-object scene may repeat by chance, not most


def test_captions_iterates_the_getitem_captions_in_order(reg: Registry) -> None:
    ds = build(reg, "val", captions_per_image=2)
    expected = [c for i in range(len(ds)) for c in ds[i].captions]
    assert list(ds.captions()) == expected
    assert len(expected) == 16 * 2


def test_every_caption_names_every_object_and_the_count(reg: Registry) -> None:
    ds = build(reg, size=200, max_objects=4, captions_per_image=5)
    seen_counts = set()
    for i in range(len(ds)):
        sample = ds[i]
        objects = sample.meta["objects"]
        n = len(objects)
        seen_counts.add(n)
        assert 1 <= n <= 4
        assert len({o["position"] for o in objects}) == n  # one object per grid cell
        for caption in sample.captions:
            for obj in objects:
                for word in (obj["size"], obj["color"], obj["shape"], f"the {obj['position']}"):
                    assert mentions(caption, word), (caption, obj)
            # the count in words for several objects, and no wrong count for any scene
            if n > 1:
                assert mentions(caption, COUNTS[n]), caption
            wrong = [w for k, w in COUNTS.items() if k != n]
            assert not any(mentions(caption, w) for w in wrong), caption
    assert seen_counts == {1, 2, 3, 4}


def test_max_objects_and_captions_per_image_are_obeyed(reg: Registry) -> None:
    ds = build(reg, max_objects=1, captions_per_image=1)
    for i in range(32):
        sample = ds[i]
        assert len(sample.meta["objects"]) == 1 and len(sample.captions) == 1
    assert ds.describe() == "synthetic scenes: 64 train images, 1 object, seed 0"
    assert build(reg, "val", seed=7).describe() == "synthetic scenes: 16 val images, 1-3 objects, seed 7"


def nearest_reference(pixel: tuple[int, int, int]) -> str:
    return min(REFERENCE_RGB, key=lambda name: sum((a - b) ** 2 for a, b in zip(pixel, REFERENCE_RGB[name])))


@pytest.mark.parametrize("image_size", [128, 224])
def test_pixels_show_the_named_colours_where_the_caption_says(reg: Registry, image_size: int) -> None:
    ds = build(reg, size=120, image_size=image_size, max_objects=4)
    checked = 0
    for i in range(len(ds)):
        sample = ds[i]
        cell = image_size / 3
        occupied = set()
        for obj in sample.meta["objects"]:
            row, col = GRID[obj["position"]]
            occupied.add((row, col))
            if obj["size"] != "large":
                continue  # a small shape may sit off its cell's centre
            centre = (int((col + 0.5) * cell), int((row + 0.5) * cell))
            assert nearest_reference(sample.image.getpixel(centre)) == obj["color"], (sample.key, obj)
            checked += 1
        for row, col in set(GRID.values()) - occupied:  # empty cells are light background
            centre = (int((col + 0.5) * cell), int((row + 0.5) * cell))
            assert min(sample.image.getpixel(centre)) >= 200, (sample.key, row, col)
    assert checked >= 100


def test_unknown_split_is_rejected_naming_the_splits(reg: Registry) -> None:
    with pytest.raises(ValueError, match="train.*val"):
        build(reg, "test")


@pytest.mark.parametrize(
    "fields",
    [
        {"max_objects": 0}, {"max_objects": 5}, {"captions_per_image": 0}, {"captions_per_image": 6},
        {"size": 0}, {"image_size": 8}, {"seed": -1}, {"colour": "red"},
    ],
)
def test_config_bounds_are_enforced(reg: Registry, fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        build(reg, **fields)

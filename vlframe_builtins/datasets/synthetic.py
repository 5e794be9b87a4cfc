"""Synthetic captioned scenes: the built-in default dataset, generated on the fly.

Each image shows one to ``max_objects`` coloured shapes on a light background, each in its own
cell of a 3x3 grid; every caption names each object's size, colour, shape and position (and the
object count when there are several). Captions therefore carry exactly what the image shows,
so a small CoCa learns retrieval and captioning on a CPU within minutes, with no download.

Sample ``i`` of a split is a pure function of ``(seed, split, i)``: a private ``random.Random``
seeded from a SHA-256 of that tuple draws the whole scene description (objects, placement,
background, caption templates) before anything is drawn in pixels, so ``captions()`` replays
the same draws without rendering, and train and val come from different streams.
"""

from __future__ import annotations

import hashlib
import operator
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from PIL import Image, ImageDraw
from pydantic import Field, model_validator

from registry import ComponentConfig, ComponentSpec, hookimpl
from vlframe.sdk import Sample

SPLITS = ("train", "val")

SHAPES = ("circle", "square", "triangle", "diamond", "cross")

# Saturated, well separated from each other and from the light backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 150, 50),
    "blue": (35, 70, 215),
    "yellow": (235, 195, 0),
    "purple": (130, 40, 170),
    "orange": (245, 125, 0),
    "black": (25, 25, 25),
}

# Half-extent of a shape as a fraction of a grid cell; large is twice small.
SIZES: dict[str, float] = {"small": 0.2, "large": 0.4}

# Grid cells in reading order (row-major), with the phrase a caption uses for each.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
WHERE: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}

COUNT_WORDS = {2: "two", 3: "three", 4: "four"}

# Cell margin left free around a shape whatever its jitter, so neighbours never touch.
_MARGIN = 0.08


class SyntheticConfig(ComponentConfig):
    size: int = Field(20000, ge=1, description="Train images per epoch.")
    val_size: int = Field(500, ge=1, description="Validation images.")
    image_size: int = Field(128, ge=48, le=2048, description="Render resolution (square side), in pixels.")
    seed: int = Field(0, ge=0, description="Selects the scenes; the same seed gives the same images and captions.")
    max_objects: int = Field(3, ge=1, le=4, description="Most objects in one image (at least one, each in its own 3x3 grid cell).")
    captions_per_image: int = Field(3, ge=1, le=5, description="Paraphrased captions per image (all different).")
    label: Literal["shape", "color", "size"] | None = Field(
        None, description="Also a classification set: each image's label is this attribute of its one object "
        "(needs max_objects: 1); class names in `classes`, for zero-shot and probes.")

    @model_validator(mode="after")
    def _one_object_to_label(self) -> SyntheticConfig:
        if self.label is not None and self.max_objects != 1:
            raise ValueError("label needs max_objects: 1 (an image with several objects has several labels)")
        return self


@dataclass(frozen=True)
class _Object:
    shape: str
    color: str
    size: str
    position: str
    # Centre offset from the cell centre, in cell units (the drawn jitter).
    dx: float
    dy: float

    def words(self) -> dict[str, str]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class _Scene:
    objects: list[_Object]  # in reading order, which is also caption order
    background: tuple[int, int, int]
    captions: list[str]


# ---- captions -------------------------------------------------------------------------------


def _plain(o: _Object) -> str:
    return f"a {o.size} {o.color} {o.shape} {WHERE[o.position]}"


def _where_first(o: _Object) -> str:
    return f"{WHERE[o.position]} is a {o.size} {o.color} {o.shape}"


def _color_after(o: _Object) -> str:
    return f"a {o.size} {o.shape} in {o.color} {WHERE[o.position]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(template: int, objects: list[_Object]) -> str:
    """One sentence in paraphrase style ``template`` (0..4); every style names every attribute."""
    n = len(objects)
    count = COUNT_WORDS.get(n, "")
    if template == 0:
        body = _join([_plain(o) for o in objects])
        text = body if n == 1 else f"{count} shapes: {body}"
    elif template == 1:
        body = _join([_plain(o) for o in objects])
        text = f"there is {body}" if n == 1 else f"there are {count} shapes, {body}"
    elif template == 2:
        body = _join([_where_first(o) for o in objects])
        text = body if n == 1 else f"an image with {count} shapes: {body}"
    elif template == 3:
        body = _join([_color_after(o) for o in objects])
        text = f"a picture of {body}" if n == 1 else f"a picture of {count} shapes: {body}"
    else:
        o = objects[0]
        if n == 1:
            text = f"a single {o.size} {o.color} {o.shape} {WHERE[o.position]}"
        else:
            text = f"{_join([_plain(o) for o in objects])}, {count} shapes in all"
    return text + "."


N_TEMPLATES = 5


# ---- scenes ---------------------------------------------------------------------------------


def _rng(seed: int, split: str, index: int) -> random.Random:
    # hashlib, not hash(): Python salts str hashes per process, which would change the scenes.
    digest = hashlib.sha256(f"vlframe.synthetic/{seed}/{split}/{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _draw_scene(cfg: SyntheticConfig, split: str, index: int) -> _Scene:
    """Every random choice for one image, in a fixed order; nothing here touches pixels."""
    rng = _rng(cfg.seed, split, index)
    n = rng.randint(1, cfg.max_objects)
    cells = sorted(rng.sample(range(len(POSITIONS)), n))  # reading order: a learnable caption order
    objects = []
    for cell in cells:
        size = rng.choice(list(SIZES))
        slack = 0.5 - SIZES[size] - _MARGIN  # how far the shape may move and stay in its cell
        objects.append(
            _Object(
                shape=rng.choice(SHAPES),
                color=rng.choice(list(COLORS)),
                size=size,
                position=POSITIONS[cell],
                dx=rng.uniform(-slack, slack),
                dy=rng.uniform(-slack, slack),
            )
        )
    background = tuple(rng.randint(222, 250) for _ in range(3))
    templates = rng.sample(range(N_TEMPLATES), cfg.captions_per_image)  # distinct paraphrases
    return _Scene(objects, background, [_caption(t, objects) for t in templates])


def _render(scene: _Scene, image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), scene.background)
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    for o in scene.objects:
        row, col = divmod(POSITIONS.index(o.position), 3)
        cx = (col + 0.5 + o.dx) * cell
        cy = (row + 0.5 + o.dy) * cell
        r = SIZES[o.size] * cell
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            s = r * 0.85  # a full-extent square looks much heavier than the other shapes
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        else:  # cross
            w = r / 3
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return image


# ---- the dataset ----------------------------------------------------------------------------


class SyntheticScenes:
    """Map-style dataset of one split; images are rendered on demand, nothing is cached."""

    def __init__(self, cfg: SyntheticConfig, *, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; the synthetic dataset has {' and '.join(SPLITS)}")
        self.cfg = cfg
        self.split = split
        self.length = cfg.size if split == "train" else cfg.val_size
        vocabulary = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES)}
        self.classes: list[str] | None = list(vocabulary[cfg.label]) if cfg.label else None

    def __len__(self) -> int:
        return self.length

    def _check(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < self.length:
            raise IndexError(f"synthetic {self.split} index {index} out of range (0..{self.length - 1})")
        return index

    def __getitem__(self, index: int) -> Sample:
        index = self._check(index)
        scene = _draw_scene(self.cfg, self.split, index)
        meta: dict = {"objects": [o.words() for o in scene.objects]}
        if self.classes is not None:
            meta["label"] = self.classes.index(scene.objects[0].words()[self.cfg.label])
        return Sample(
            image=_render(scene, self.cfg.image_size),
            captions=list(scene.captions),
            key=f"synthetic/{self.split}/{index}",
            meta=meta,
        )

    def captions(self) -> Iterator[str]:
        for index in range(self.length):
            yield from _draw_scene(self.cfg, self.split, index).captions

    def describe(self) -> str:
        lo, hi = 1, self.cfg.max_objects
        objects = "1 object" if hi == lo else f"{lo}-{hi} objects"
        labels = f", labelled by {self.cfg.label}" if self.cfg.label else ""
        return f"synthetic scenes: {self.length} {self.split} images, {objects}, seed {self.cfg.seed}{labels}"


@hookimpl
def vlframe_datasets() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="synthetic",
            config=SyntheticConfig,
            factory=SyntheticScenes,
            summary="Generated coloured-shape scenes with grounded captions (no download; the default).",
        )
    ]

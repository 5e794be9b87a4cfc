"""What dataset plugins produce: samples, sample errors, and a safe image loader."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from registry import one_line

#: Images with more pixels are unusable samples (a decompression bomb would fill the memory):
#: PIL's own default, changed with ``data.max_image_pixels`` (:func:`set_max_image_pixels`).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int) -> None:
    """The largest image (in pixels) :func:`load_image` decodes; larger ones are :class:`SampleError`."""
    global _max_pixels
    _max_pixels = int(limit)
    Image.MAX_IMAGE_PIXELS = max(int(limit), DEFAULT_MAX_IMAGE_PIXELS)  # PIL refuses at 2x this itself


@dataclass
class Sample:
    """One image with its captions. ``key`` names it in messages (usually its file path)."""

    image: Image.Image
    captions: list[str]
    key: str
    meta: dict = field(default_factory=dict)


@dataclass
class SampleError(Exception):
    """A sample that cannot be used: the loader skips it, counts it and names it in its report."""

    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}"


def load_image(path: str | Path, key: str | None = None) -> Image.Image:
    """Open an image file fully decoded as RGB, or raise :class:`SampleError` saying why not."""
    key = key or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            with Image.open(path) as img:
                width, height = img.size  # from the header: nothing decoded yet
                if width * height > _max_pixels:
                    raise SampleError(key, _too_large(width, height))
                img.load()  # decode now: a truncated file fails here, not later in a transform
                return img.convert("RGB")
    except FileNotFoundError:
        raise SampleError(key, "file not found") from None
    except Image.DecompressionBombError as exc:  # PIL's own check, at twice its limit, came first
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{_pixels(int(found.group(1)))}, " if found else ""
        raise SampleError(key, f"image too large ({size}more than data.max_image_pixels "
                               f"{_pixels(_max_pixels)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError(key, f"cannot decode image ({one_line(exc, hint=False)})") from None
    except MemoryError:
        raise SampleError(key, "not enough memory to decode the image") from None


def _too_large(width: int, height: int) -> str:
    return (f"image too large ({width} x {height} = {_pixels(width * height)}, more than "
            f"data.max_image_pixels {_pixels(_max_pixels)})")


def _pixels(count: int) -> str:
    return f"{count / 1e6:.0f} Mpixels" if count >= 10**6 else f"{count:,} pixels"


def clean_captions(captions: list[str], key: str) -> list[str]:
    """Strip captions and drop empty ones; no caption left is a :class:`SampleError`."""
    kept = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not kept:
        raise SampleError(key, "no non-empty caption")
    return kept


class FileDataset:
    """Map-style dataset over ``(image path, captions)`` entries, as manifest plugins build them.

    Entries whose image file is missing or whose captions are all empty are set aside when the
    dataset is built (``skipped``); images that turn out corrupt raise :class:`SampleError` when
    read. Either way the loader counts them and names them in its report.
    """

    def __init__(self, entries: list[tuple[Path, list[str]]], description: str) -> None:
        self.entries: list[tuple[Path, list[str]]] = []
        self.skipped: list[SampleError] = []
        for path, captions in entries:
            try:
                captions = clean_captions(captions, str(path))
                if not path.is_file():
                    raise SampleError(str(path), "file not found")
            except SampleError as err:
                self.skipped.append(err)
                continue
            self.entries.append((path, captions))
        self.description = description

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        path, captions = self.entries[index]
        return Sample(load_image(path), list(captions), str(path))

    def captions(self):
        for _, captions in self.entries:
            yield from captions

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        return f"{self.description}: {len(self.entries)} images{skipped}"

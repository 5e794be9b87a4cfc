"""What dataset plugins produce: samples, sample errors, and a safe image loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError


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
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later in a transform
            return img.convert("RGB")
    except FileNotFoundError:
        raise SampleError(key, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise SampleError(key, f"cannot decode image ({type(exc).__name__}: {exc})") from None


def clean_captions(captions: list[str], key: str) -> list[str]:
    """Strip captions and drop empty ones; no caption left is a :class:`SampleError`."""
    kept = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not kept:
        raise SampleError(key, "no non-empty caption")
    return kept

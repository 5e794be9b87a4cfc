"""A matching task derived from any captioned dataset: does this caption belong to this image?

``vlframe data match-pairs`` writes it as the JSONL rows the ``understanding`` task trains and
tests on: ``{"image", "text", "label": "yes" | "no"}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from vlframe.evaluation.datasets import iter_samples


def write_match_pairs(dataset: Any, out_dir: Path, *, limit: int | None = None, seed: int = 0) -> Path:
    """Derive a matching task from a captioned dataset: every image once with one of its own
    captions (label ``yes``) and once with a caption of another image (``no``).

    Writes the images (PNG) and ``pairs.jsonl`` into ``out_dir``; returns the JSONL path.
    """
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    samples = list(iter_samples(dataset, limit))
    if len(samples) < 2:
        raise ValueError("a matching task needs at least two images")
    lines = []
    for i, sample in enumerate(samples):
        name = f"images/{i:06d}.png"
        sample.image.save(out_dir / name)
        lines.append({"image": name, "text": rng.choice(sample.captions), "label": "yes", "source": sample.key})
        for _ in range(20):  # a caption of another image, unless every try says the same as this one's
            other = samples[(i + rng.randrange(1, len(samples))) % len(samples)]
            other_caption = rng.choice(other.captions)
            if other_caption not in sample.captions:
                lines.append({"image": name, "text": other_caption, "label": "no", "source": sample.key})
                break
    rng.shuffle(lines)
    path = out_dir / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path

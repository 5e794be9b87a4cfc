"""Files an evaluation leaves behind: ``metrics.json`` and a captions page to look at."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlframe.evaluation.tasks import EvalResult


def thumbnail(image: Any, side: int = 160) -> str:
    """A JPEG thumbnail of a PIL image, base64-encoded for an ``<img src='data:...'>``."""
    picture = image.copy()
    picture.thumbnail((side, side))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_caption_table(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """A self-contained HTML page: each image (``thumbnail``) beside its ``caption`` and ``references``."""
    cells = []
    for row in rows:
        refs = "".join(f"<li>{html.escape(r)}</li>" for r in row["references"])
        cells.append(
            f"<tr><td><img src='data:image/jpeg;base64,{row['thumbnail']}'></td>"
            f"<td><b>{html.escape(row['caption'])}</b><ul>{refs}</ul><small>{html.escape(row['key'])}</small></td></tr>"
        )
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px}ul{color:#555}</style>"
            f"<h2>{html.escape(title)}</h2><table>{''.join(cells)}</table>")
    path.write_text(page, encoding="utf-8")
    return path


def save_result(result: EvalResult, out_dir: Path) -> Path:
    """``out_dir/metrics.json``: the task, its metrics and its info (added to ``result.files``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps({"task": result.task, "metrics": result.metrics, "info": result.info}, indent=2,
                               default=str), encoding="utf-8")
    if path not in result.files:
        result.files.append(path)
    return path

"""Comparing a sweep's variants side by side, read back from MLflow.

One row per variant (the child runs of the sweep's parent run), one column per metric, laid out
like the paper's ablation tables, with the best value of each column marked. The same table is
written as CSV and Markdown, with a bar chart per metric, and filed as artifacts of the parent.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import VlframeError
from vlframe.sweep import TAG_ERROR, TAG_OVERRIDES, TAG_VARIANT, children, expand, find_parent, load_sweep, \
    tracking_target


@dataclass(frozen=True)
class Column:
    key: str  # the MLflow metric
    label: str
    higher_is_better: bool


#: Columns in table order; zero-shot columns are added for every labelled set a sweep evaluated.
COLUMNS = (
    Column("val/loss_caption", "val cap. loss", False),
    Column("val/loss_contrastive", "val con. loss", False),
    Column("eval/retrieval/i2t_r1", "i2t R@1", True),
    Column("eval/retrieval/t2i_r1", "t2i R@1", True),
    Column("eval/caption/cider", "CIDEr", True),
    Column("eval/caption/bleu4", "BLEU-4", True),
    Column("cost/params_m", "params (M)", False),
    Column("cost/s_per_step", "s/step", False),
)


@dataclass
class Row:
    variant: str
    status: str
    run_id: str
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


class CompareError(VlframeError):
    """The sweep or parent run named cannot be found."""


def resolve_parent(source: str, tracking_uri: str | None) -> tuple[str, str, list[str]]:
    """(tracking URI, parent run id, variant order) for a sweep file or a parent run id."""
    from mlflow import MlflowClient

    from vlframe.pretrained import mlflow_uri

    path = Path(source)
    if path.is_file():
        sweep = load_sweep(path)
        uri, experiment = tracking_target(sweep)
        uri = tracking_uri or uri
        parent = find_parent(MlflowClient(tracking_uri=uri), experiment, sweep.name)
        if parent is None:
            raise CompareError(f"{path}: sweep '{sweep.name}' has no runs in experiment '{experiment}' at {uri} "
                               f"(run it with: vlframe sweep {path})")
        return uri, parent, [name for name, _ in expand(sweep)]
    if re.fullmatch(r"[0-9a-f]{32}", source):
        return mlflow_uri(tracking_uri), source, []
    raise CompareError(f"{source}: neither a sweep file nor an MLflow run id")


def collect(client: Any, parent_id: str, order: Sequence[str] = ()) -> list[Row]:
    """Each variant's newest run under the parent, with its latest metric values."""
    newest: dict[str, Any] = {}
    for run in sorted(children(client, parent_id), key=lambda r: r.info.start_time or 0):
        newest[run.data.tags.get(TAG_VARIANT, run.info.run_name or run.info.run_id)] = run
    rank = {name: i for i, name in enumerate(order)}
    rows = []
    for name, run in sorted(newest.items(), key=lambda item: (rank.get(item[0], len(rank)), item[1].info.start_time)):
        rows.append(Row(name, run.info.status.lower(), run.info.run_id,
                        list(_json_list(run.data.tags.get(TAG_OVERRIDES, "[]"))), dict(run.data.metrics),
                        run.data.tags.get(TAG_ERROR, "")))
    return rows


def _json_list(text: str) -> list[str]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def columns_for(rows: Sequence[Row]) -> list[Column]:
    """The default columns any row has a value for, with a column per zero-shot set."""
    keys = {k for row in rows for k in row.metrics}
    zeroshot = sorted({m.group(1) for k in keys if (m := re.fullmatch(r"eval/zeroshot_(.+)/top1", k))})
    columns = list(COLUMNS[:4]) + [Column(f"eval/zeroshot_{n}/top1", f"ZS {n} top-1", True) for n in zeroshot]
    columns += list(COLUMNS[4:])
    return [c for c in columns if c.key in keys]


def best(rows: Sequence[Row], column: Column) -> float | None:
    values = [r.metrics[column.key] for r in rows if column.key in r.metrics and math.isfinite(r.metrics[column.key])]
    if not values:
        return None
    return max(values) if column.higher_is_better else min(values)


def cells(rows: Sequence[Row], columns: Sequence[Column], *, mark: str = "*") -> list[list[str]]:
    """The table as text cells: values to 2 decimals, '-' where a variant has none, best marked."""
    bests = {c.key: best(rows, c) for c in columns}
    table = []
    for row in rows:
        line = [row.variant, row.status]
        for c in columns:
            value = row.metrics.get(c.key)
            if value is None:
                line.append("-")
            else:
                line.append(f"{value:.2f}{mark if bests[c.key] is not None and value == bests[c.key] else ''}")
        table.append(line)
    return table


def render_text(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    header = ["variant", "status"] + [c.label + (" ^" if c.higher_is_better else " v") for c in columns]
    body = cells(rows, columns)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    lines.append("* best in its column (^ higher is better, v lower is better); - not applicable or failed")
    for row in rows:
        if row.error:
            lines.append(f"{row.variant}: {row.error.splitlines()[0][:300]}")
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    header = ["variant", "status"] + [c.label for c in columns]
    body = cells(rows, columns, mark="**")
    body = [[v if not v.endswith("**") else f"**{v[:-2]}**" for v in line] for line in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n\nBold: best in its column.\n"


def render_csv(rows: Sequence[Row], columns: Sequence[Column]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "status", "run_id", "overrides"] + [c.key for c in columns])
    for row in rows:
        writer.writerow([row.variant, row.status, row.run_id, ";".join(row.overrides)]
                        + [repr(row.metrics[c.key]) if c.key in row.metrics else "" for c in columns])
    return buffer.getvalue()


def plot(rows: Sequence[Row], columns: Sequence[Column], path: Path, title: str) -> Path:
    """A bar chart per metric, variants along each; the best bar dark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(columns))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 0.35 * len(rows) * nrows + 1.5 * nrows), squeeze=False)
    names = [r.variant for r in rows]
    for ax, column in zip(axes.flat, columns):
        values = [r.metrics.get(column.key, float("nan")) for r in rows]
        top = best(rows, column)
        colours = ["#1f4e79" if v == top else "#9dc3e6" for v in values]
        ax.barh(range(len(rows)), [0 if math.isnan(v) else v for v in values], color=colours)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(column.label + (" (higher better)" if column.higher_is_better else " (lower better)"), fontsize=9)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(source: str, *, tracking_uri: str | None = None, out_dir: Path | None = None) -> tuple[str, str, list[Path]]:
    """Read a sweep back; return (parent run id, the table as text, the files written and logged)."""
    from mlflow import MlflowClient

    uri, parent_id, order = resolve_parent(source, tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    rows = collect(client, parent_id, order)
    if not rows:
        raise CompareError(f"parent run {parent_id} at {uri} has no variant runs yet")
    columns = columns_for(rows)
    text = render_text(rows, columns)
    name = client.get_run(parent_id).data.tags.get("vlframe.sweep", parent_id)
    out_dir = out_dir or Path("runs") / "sweeps" / name / "comparison"
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png"]
    files[0].write_text(render_csv(rows, columns), encoding="utf-8")
    files[1].write_text(f"# Sweep {name}\n\n" + render_markdown(rows, columns), encoding="utf-8")
    plot(rows, columns, files[2], f"sweep {name}")
    for path in files:
        client.log_artifact(parent_id, str(path), "comparison")
    return parent_id, text, files


__all__ = ["COLUMNS", "Column", "CompareError", "Row", "collect", "compare", "render_csv",
           "render_markdown", "render_text"]

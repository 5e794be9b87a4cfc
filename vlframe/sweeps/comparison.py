"""Comparing a sweep's variants side by side, read back from their tracking store.

One row per variant (the child runs of the sweep's parent run), one column per metric the
variants logged (validation losses and periodic tasks ``val/*``, evaluations ``eval/*``, cost
``cost/*``; a plugin's metric shows up like the built-ins'), with the best value of each
column marked. In a seeded sweep a cell is the mean over seeds with its 95% t interval
(:mod:`vlframe.sweeps.stats`), the best is starred only when it is significantly better than
every other variant (paired t-tests over seeds, p < 0.05), and with ``--baseline`` each
variant is tested against the baseline: a dagger where the paired t-test over seeds says
p < 0.05, a double dagger where a paired bootstrap over the test items does (for metrics that
are a mean over items, whose per-item scores the tasks saved: retrieval recall, CIDEr-D,
ROUGE-L; it needs no extra training and works with one seed). A variant that could not run a task (it lacks the capability) says so in its
cells and under the table. The same table is written as CSV and Markdown, with a bar chart per
metric, and filed as artifacts of the parent run (through a journal).

A metric is read as lower-is-better when its name says loss, error, perplexity, params, seconds
or s_per_step; higher-is-better otherwise.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry import VlframeError
from registry.protocols import TrackingSink
from vlframe.runs import sinks, tags
from vlframe.sweeps import stats
from vlframe.sweeps.sweep import children, expand, find_parent, load_sweep, sweep_folder, tracking_target

#: Prefixes of the metrics compared; train/* and system/* describe the run, not the model.
PREFIXES = ("val/", "eval/", "cost/")
#: Logged for the record but not compared (its inverse, s/step, is).
LEFT_OUT = ("cost/images_per_s",)
_LOWER = re.compile(r"loss|error|perplexity|params|s_per_step|seconds")
#: Cell text of a metric a variant cannot have.
NOT_APPLICABLE = "n/a"


@dataclass(frozen=True)
class Column:
    key: str  # the tracked metric
    label: str
    higher_is_better: bool


@dataclass
class Row:
    variant: str
    status: str
    run_id: str
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    #: Tasks this variant could not run, with the reason (from its vlframe.eval_skipped.* tags), and
    #: periodic tasks its validation could not run (vlframe.val_skipped.*).
    skipped: dict[str, str] = field(default_factory=dict)
    val_skipped: dict[str, str] = field(default_factory=dict)
    #: Seeded sweeps: each finished seed's metrics, by seed (``metrics`` is then their mean).
    seeds: dict[int, dict[str, float]] = field(default_factory=dict)
    #: The run of each finished seed (one seed, the sweep's own: key 0), for its per-item scores.
    runs: dict[int, str] = field(default_factory=dict)
    #: Per-item scores of each metric that has them, by seed: {metric: {seed: {item: score}}}.
    items: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)

    def values(self, key: str) -> dict[int, float]:
        return {s: m[key] for s, m in self.seeds.items() if key in m and math.isfinite(m[key])}

    def summary(self, key: str) -> stats.Summary:
        return stats.summary(list(self.values(key).values()))


class CompareError(VlframeError):
    """The sweep or parent run named cannot be found."""


def resolve_parent(source: str, tracking_uri: str | None,
                   cli_sets: Sequence[str] = ()) -> tuple[str, str, list[str], Path | None]:
    """(tracking URI, parent run id, variant order, sweep folder) for a sweep file (run with the
    command line's ``cli_sets``) or a parent run id."""
    path = Path(source)
    if path.is_file():
        sweep = load_sweep(path, cli_sets)
        uri, experiment = tracking_target(sweep, cli_sets)
        uri = tracking_uri or uri
        parent = find_parent(sinks.sink_for(uri), experiment, sweep.name)
        if parent is None:
            raise CompareError(f"{path}: sweep '{sweep.name}' has no runs in experiment '{experiment}' at {uri} "
                               f"(run it with: vlframe sweep {path})")
        return uri, parent, [name for name, _ in expand(sweep)], sweep_folder(sweep)
    uri = sinks.store_uri(given=tracking_uri)
    entry = sinks.sink_entry(uri)  # its sink says what its run ids look like
    if re.fullmatch(entry.spec.config.run_id, source):
        return uri, source, [], None
    raise CompareError(f"{source}: neither a sweep file nor a run id of the {entry.spec.name} tracking sink at {uri}")


def collect(sink: TrackingSink, parent_id: str, order: Sequence[str] = ()) -> list[Row]:
    """Each variant's newest run under the parent (a seeded variant: its newest run per seed, the
    metrics averaged over the finished seeds), with its latest metric values."""
    newest: dict[str, dict[str, Any]] = {}
    for run in sorted(children(sink, parent_id), key=lambda r: r.start_time or 0):
        if run.tags.get(tags.VARIANT_GROUP) == "true":
            continue
        name = run.tags.get(tags.VARIANT, run.name or run.run_id)
        newest.setdefault(name, {})[run.tags.get(tags.SEED, "")] = run
    rank = {name: i for i, name in enumerate(order)}
    rows = []

    def started(item: tuple[str, dict[str, Any]]) -> tuple[int, int]:
        return rank.get(item[0], len(rank)), min(r.start_time or 0 for r in item[1].values())

    for name, by_seed in sorted(newest.items(), key=started):
        runs = [by_seed[k] for k in sorted(by_seed, key=lambda k: (k == "", int(k) if k.isdigit() else 0))]
        first = runs[0]
        run_tags = first.tags
        skipped = {k.removeprefix(tags.EVAL_SKIPPED_PREFIX): v for k, v in run_tags.items()
                   if k.startswith(tags.EVAL_SKIPPED_PREFIX)}
        val_skipped = {k.removeprefix(tags.VAL_SKIPPED_PREFIX): v for k, v in run_tags.items()
                       if k.startswith(tags.VAL_SKIPPED_PREFIX)}
        row = Row(name, first.status.lower(), first.run_id,
                  list(_json_list(run_tags.get(tags.OVERRIDES, "[]"))), dict(first.metrics),
                  run_tags.get(tags.ERROR, ""), skipped, val_skipped)
        if first.status == "FINISHED":
            row.runs = {0: first.run_id}
        seeded = [r for r in runs if r.tags.get(tags.SEED, "").lstrip("-").isdigit()]
        if seeded:
            row.overrides = [k for k in row.overrides if k != "train.seed"]
            finished = [r for r in seeded if r.status == "FINISHED"]
            row.seeds = {int(r.tags[tags.SEED]): dict(r.metrics) for r in finished}
            row.runs = {int(r.tags[tags.SEED]): r.run_id for r in finished}
            keys = {k for m in row.seeds.values() for k in m}
            row.metrics = {k: row.summary(k).mean for k in keys if row.summary(k).n}
            failed = len(seeded) - len(finished)
            row.status = "finished" if not failed else f"{len(finished)}/{len(seeded)} seeds"
            row.run_id = first.tags.get(tags.PARENT, first.run_id)
            row.error = next((r.tags.get(tags.ERROR, "") for r in seeded if r.tags.get(tags.ERROR)), "")
        rows.append(row)
    return rows


def _json_list(text: str) -> list[str]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _label(key: str) -> str:
    return key.removeprefix("eval/").replace("/", " ")


def columns_for(rows: Sequence[Row], patterns: Sequence[str] = ()) -> list[Column]:
    """A column for every compared metric any row logged (or those matching ``patterns``), in a
    stable order: validation, evaluations by task, cost."""
    keys = {k for row in rows for k in row.metrics if k.startswith(PREFIXES) and k not in LEFT_OUT}
    if patterns:
        keys = {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    # A task no variant could run still gets a column, so that each row can say why it has no value.
    unrun = {t for row in rows for t in row.skipped} - {_task_of(k) for k in keys if k.startswith("eval/")}
    if not patterns or any(fnmatch.fnmatchcase(f"eval/{t}", p) for t in unrun for p in patterns):
        keys |= {f"eval/{t}" for t in unrun}
    order = {prefix: i for i, prefix in enumerate(PREFIXES)}
    ranked = sorted(keys, key=lambda k: (order[next(p for p in PREFIXES if k.startswith(p))], k))
    return [Column(k, _label(k), not _LOWER.search(k)) for k in ranked]


def _task_of(key: str) -> str | None:
    parts = key.split("/")
    return parts[1] if len(parts) >= 2 and parts[0] in ("eval", "val") else None


def _not_applicable(row: Row, key: str) -> bool:
    """Whether the row cannot have ``key``: a task (or periodic validation task) it could not run."""
    task = _task_of(key)
    return task in (row.val_skipped if key.startswith("val/") else row.skipped)


def best(rows: Sequence[Row], column: Column) -> float | None:
    values = [r.metrics[column.key] for r in rows if column.key in r.metrics and math.isfinite(r.metrics[column.key])]
    if not values:
        return None
    return max(values) if column.higher_is_better else min(values)


def seeded(rows: Sequence[Row]) -> bool:
    return any(len(r.seeds) > 1 for r in rows)


def significantly_best(rows: Sequence[Row], column: Column) -> Row | None:
    """The row with the best mean, when paired tests over seeds find it better than every other
    row with values (p < 0.05 each); None otherwise."""
    top = best(rows, column)
    leader = next((r for r in rows if r.metrics.get(column.key) == top), None) if top is not None else None
    if leader is None:
        return None
    others = [r for r in rows if r is not leader and column.key in r.metrics]
    for other in others:
        test = stats.paired(leader.values(column.key), other.values(column.key))
        if not test.significant():
            return None
    return leader if others else None


def against(rows: Sequence[Row], baseline: str | None, column: Column) -> dict[str, stats.Paired]:
    base = next((r for r in rows if r.variant == baseline), None)
    if base is None:
        return {}
    return {r.variant: stats.paired(r.values(column.key), base.values(column.key)) for r in rows
            if r is not base and column.key in r.metrics}


def bootstrapped(rows: Sequence[Row], baseline: str | None, column: Column) -> dict[str, stats.Bootstrap]:
    """Each variant against ``baseline`` by a paired bootstrap over the test items, for a metric
    with per-item scores on both sides."""
    base = next((r for r in rows if r.variant == baseline), None)
    if base is None or column.key not in base.items:
        return {}
    return {r.variant: stats.paired_bootstrap(r.items[column.key], base.items[column.key]) for r in rows
            if r is not base and column.key in r.items}


def load_items(sink: TrackingSink, rows: Sequence[Row], columns: Sequence[Column], folder: Path) -> None:
    """Fill each row's ``items`` from its runs' ``eval/<task>/items.json`` artifacts (a run
    evaluated before vlframe saved them has none: its metrics are then only tested over seeds)."""
    import json

    from vlframe.evaluation.tasks import ITEMS_FILE

    tasks = sorted({_task_of(c.key) for c in columns if c.key.startswith("eval/")} - {None})
    for row in rows:
        for seed, run_id in row.runs.items():
            for task in tasks:
                target = folder / run_id / task
                path = target / ITEMS_FILE
                if not path.is_file():
                    target.mkdir(parents=True, exist_ok=True)
                    try:
                        sink.download(run_id, f"eval/{task}/{ITEMS_FILE}", target)
                    except Exception:  # noqa: BLE001 - absent (older run, or a task without items)
                        continue
                try:
                    scores = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                for metric, each in scores.items() if isinstance(scores, dict) else ():
                    if isinstance(each, dict):
                        values = {str(k): float(v) for k, v in each.items() if isinstance(v, (int, float))}
                        row.items.setdefault(f"eval/{task}/{metric}", {})[seed] = values


def cells(rows: Sequence[Row], columns: Sequence[Column], *, mark: str = "*", baseline: str | None = None) -> list[list[str]]:
    """The table as text cells: values to 2 decimals (seeded: mean +- the 95% interval's half
    width), n/a where the variant cannot have the metric (it lacks the capability), '-' where it
    has none (failed); the best marked (seeded: only when significantly best), a dagger where
    a variant differs significantly from ``baseline`` over seeds, and a double dagger where it
    does by the paired bootstrap over test items."""
    with_seeds = seeded(rows)
    table = []
    for row in rows:
        line = [row.variant, row.status]
        for c in columns:
            value = row.metrics.get(c.key)
            if value is None:
                line.append(NOT_APPLICABLE if _not_applicable(row, c.key) else "-")
                continue
            text = f"{value:.2f}"
            half = row.summary(c.key).half_width if with_seeds else None
            if half is not None:
                text += f" ± {half:.2f}"
            tested = against(rows, baseline, c).get(row.variant)
            if tested is not None and tested.significant():
                text += "†"
            resampled = bootstrapped(rows, baseline, c).get(row.variant)
            if resampled is not None and resampled.significant():
                text += "‡"
            winner = significantly_best(rows, c) if with_seeds else None
            is_best = (winner is row) if with_seeds else (value == best(rows, c))
            line.append(text + (mark if is_best else ""))
        table.append(line)
    return table


def _notes(rows: Sequence[Row]) -> list[str]:
    lines = []
    for row in rows:
        for task, why in sorted(row.skipped.items()):
            lines.append(f"{row.variant}: {task} not run ({why})")
        for task, why in sorted(row.val_skipped.items()):
            lines.append(f"{row.variant}: {task} not run in validation ({why})")
        if row.error:
            lines.append(f"{row.variant}: {row.error.splitlines()[0][:300]}")
    return lines


def _bootstrap_legend(rows: Sequence[Row], baseline: str | None) -> str:
    base = next((r for r in rows if r.variant == baseline), None)
    if base is None or not base.items:
        return ""
    return (f"; ‡: differs from {baseline} by a paired bootstrap over the test items ({stats.RESAMPLES} resamples, "
            "the same items for every seed, p < 0.05; retrieval recall and per-image caption scores)")


def _legend(rows: Sequence[Row], baseline: str | None, *, markdown: bool = False) -> str:
    star = "Bold" if markdown else "*"
    if not seeded(rows):
        return (f"{star}: best in its column (one seed per variant: no interval, no test over seeds; add seeds: to "
                "the sweep for them)" + _bootstrap_legend(rows, baseline))
    counts = sorted({len(r.seeds) for r in rows if r.seeds})
    text = (f"mean ± half width of the 95% Student-t interval over {'/'.join(map(str, counts))} seeds; {star}: best "
            "and better than every other variant by a paired t-test over seeds (p < 0.05): no mark where the best "
            "is within the noise")
    if baseline:
        text += f"; †: differs from {baseline} (paired t-test over seeds, p < 0.05)"
    return text + _bootstrap_legend(rows, baseline)


def render_text(rows: Sequence[Row], columns: Sequence[Column], baseline: str | None = None) -> str:
    header = ["variant", "status"] + [c.label + (" ^" if c.higher_is_better else " v") for c in columns]
    body = cells(rows, columns, baseline=baseline)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    lines.append(f"{_legend(rows, baseline)}; ^ higher is better, v lower is better; {NOT_APPLICABLE}: the variant "
                 "cannot run that task; - not logged (the variant has no such objective, or it failed)")
    return "\n".join(lines + _notes(rows))


def render_markdown(rows: Sequence[Row], columns: Sequence[Column], baseline: str | None = None) -> str:
    header = ["variant", "status"] + [c.label for c in columns]
    body = cells(rows, columns, mark="**", baseline=baseline)
    body = [[v if not v.endswith("**") else f"**{v[:-2]}**" for v in line] for line in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    notes = "".join(f"- {note}\n" for note in _notes(rows))
    return "\n".join(lines) + f"\n\n{_legend(rows, baseline, markdown=True)}. {NOT_APPLICABLE}: the variant cannot " \
        "run that task.\n" + (f"\n{notes}" if notes else "")


def render_csv(rows: Sequence[Row], columns: Sequence[Column], baseline: str | None = None) -> str:
    """One column per metric (the mean in a seeded sweep), then, seeded, its standard deviation,
    95% interval, seed count and (with a baseline) the paired test's p-value, per metric; with a
    baseline and per-item scores, the paired bootstrap's difference, interval and p-value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    extra = ("std", "ci95_low", "ci95_high", "n") + ((f"p_vs_{baseline}",) if baseline else ())
    with_seeds = seeded(rows)
    resampled = {c.key: bootstrapped(rows, baseline, c) for c in columns} if baseline else {}
    boot_columns = [c for c in columns if resampled.get(c.key)]
    boot_extra = (f"diff_vs_{baseline}", "boot95_low", "boot95_high", f"pboot_vs_{baseline}", "items")
    writer.writerow(["variant", "status", "run_id", "overrides"] + [c.key for c in columns]
                    + ([f"{c.key} {e}" for c in columns for e in extra] if with_seeds else [])
                    + [f"{c.key} {e}" for c in boot_columns for e in boot_extra])
    for row in rows:
        line = [row.variant, row.status, row.run_id, ";".join(row.overrides)]
        line += [repr(row.metrics[c.key]) if c.key in row.metrics
                 else (NOT_APPLICABLE if _not_applicable(row, c.key) else "") for c in columns]
        if with_seeds:
            for c in columns:
                info = row.summary(c.key)
                tested = against(rows, baseline, c).get(row.variant) if baseline else None
                values = [info.std, info.low, info.high, info.n] + ([tested.p if tested else None] if baseline else [])
                line += ["" if v is None else repr(v) for v in values]
        for c in boot_columns:
            test = resampled[c.key].get(row.variant)
            values = [test.difference, test.low, test.high, test.p, test.items] if test else [None] * 5
            line += ["" if v is None else repr(v) for v in values]
        writer.writerow(line)
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
        errors = [r.summary(column.key).half_width or 0.0 for r in rows] if seeded(rows) else None
        ax.barh(range(len(rows)), [0 if math.isnan(v) else v for v in values], color=colours, xerr=errors,
                error_kw={"ecolor": "#333333", "capsize": 3})  # the 95% interval over seeds
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


def compare(source: str, *, tracking_uri: str | None = None, out_dir: Path | None = None,
            metrics: Sequence[str] = (), baseline: str | None = None,
            cli_sets: Sequence[str] = ()) -> tuple[str, str, list[Path], Any]:
    """Read a sweep back; return (parent run id, the table as text, the files written, and the
    tracking report of filing them). ``metrics``: glob patterns of the columns to show."""
    from vlframe.runs.tracking import Tracker

    uri, parent_id, order, folder = resolve_parent(source, tracking_uri, cli_sets)
    sink = sinks.sink_for(uri)
    try:
        parent = sink.get_run(parent_id)
    except LookupError as exc:
        raise CompareError(f"{exc}; pass --tracking-uri to name its store") from None
    name = parent.tags.get(tags.SWEEP, parent_id)
    recorded = Path(parent.tags.get(tags.RUN_DIR, "")) if parent.tags.get(tags.RUN_DIR) else None
    if folder is None and recorded is not None and recorded.is_dir():  # the sweep's folder, on this machine
        folder = recorded
    rows = collect(sink, parent_id, order)
    if not rows:
        raise CompareError(f"parent run {parent_id} at {uri} has no variant runs yet")
    if baseline is not None and baseline not in {r.variant for r in rows}:
        raise CompareError(f"--baseline {baseline}: no such variant; variants: {', '.join(r.variant for r in rows)}")
    columns = columns_for(rows, metrics)
    out_dir = out_dir or (folder / "comparison" if folder is not None else sinks.DEFAULT_OUTPUT / "sweeps" / name /
                          "comparison")
    out_dir.mkdir(parents=True, exist_ok=True)
    if baseline is not None:
        load_items(sink, rows, columns, out_dir / "items")
    text = render_text(rows, columns, baseline)
    files = [out_dir / "comparison.csv", out_dir / "comparison.md", out_dir / "comparison.png"]
    files[0].write_text(render_csv(rows, columns, baseline), encoding="utf-8")
    files[1].write_text(f"# Sweep {name}\n\n" + render_markdown(rows, columns, baseline), encoding="utf-8")
    plot(rows, columns, files[2], f"sweep {name}")
    tracker = Tracker(out_dir, uri=uri)
    tracker.start(run_name=f"sweep-{name}", run_id=parent_id, attach=True)
    for path in files:
        tracker.log_artifact(path, "comparison")
    return parent_id, text, files, tracker.finish(None)


__all__ = ["Column", "CompareError", "Row", "collect", "columns_for", "compare", "render_csv", "render_markdown",
           "render_text"]

"""The evaluation dispatcher: one path from a task config to logged metrics.

Tasks are plugins (``vlframe_tasks``; the built-in caption, retrieval, zeroshot, probe and
understanding tasks are ``vlframe_builtins.tasks``). ``vlframe eval``, sweeps and the trainer's
periodic validation all come here: :func:`run_task` checks that the model has the capabilities
the task's config ``requires``, builds the task through the catalog and runs it with a
:class:`TaskContext`; :func:`log_results` files the results under the training run in its
tracking store, through a journal, so that nothing is lost while the store is unreachable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from registry import (
    CapabilityError,
    Catalog,
    ComponentError,
    ConfigError,
    Kind,
    Problem,
    TaskConfig,
    VlframeError,
    one_line,
    require_capabilities,
)
from registry.protocols import why_not as _why_not

if TYPE_CHECKING:
    from vlframe.inference.trained import Trained
    from vlframe.runs.tracking import TrackingReport


@dataclass
class EvalResult:
    """One evaluation: ``metrics`` (rates in percent, as papers report them), ``info`` (counts,
    settings), and the ``files`` it wrote.

    ``items``: for a metric that is the mean of a score per test item (recall@k: 100 or 0 per
    query; CIDEr-D: per image), those scores by item key. They are saved beside the results
    (``items.json``, an artifact ``eval/<task>/items.json``) so that ``vlframe compare
    --baseline`` can test two variants with a paired bootstrap over the same items.
    """

    task: str
    metrics: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    items: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        values = "  ".join(f"{k} {v:.2f}" for k, v in self.metrics.items())
        return f"{self.task}: {values}"


class TaskError(ComponentError):
    """A task failed while it ran (its plugin's code raised)."""


@dataclass
class TaskContext:
    """What a task gets to run with: the loaded model, a folder for its files (created before
    ``run``; None when nothing is to be kept) and the datasets ``--data`` specs name."""

    trained: Trained
    out_dir: Path | None = None
    #: The run's validation split when the caller has it built already (training's validation).
    default_dataset: Any = None

    def dataset(self, spec: str | Path | Mapping[str, Any] | None = None, split: str = "val") -> Any:
        """The dataset a ``--data`` spec names (:mod:`vlframe.evaluation.datasets`); None: the run's
        validation split."""
        from vlframe.evaluation.datasets import build_dataset

        if spec is None and self.default_dataset is not None:
            return self.default_dataset
        return build_dataset(self.trained, spec, split)


def require(model: Any, needed: Iterable[str], what: str) -> None:
    """Moved: :func:`registry.require_capabilities` (this name warns once, then calls it)."""
    _moved("vlframe.evaluation.tasks.require", "registry.require_capabilities(model, needed, what)")
    require_capabilities(model, needed, what)


def why_not(config: TaskConfig, capabilities: Iterable[str]) -> str | None:
    """Moved: ``registry.protocols.why_not(type(config).requires, capabilities)`` (this name warns
    once, then calls it)."""
    _moved("vlframe.evaluation.tasks.why_not", "registry.protocols.why_not(type(config).requires, capabilities)")
    return _why_not(type(config).requires, capabilities)


def _moved(old: str, new: str) -> None:
    if old not in _WARNED:
        _WARNED.add(old)
        import warnings

        warnings.warn(f"{old} moved: call {new} (see CHANGELOG.md)", FutureWarning, stacklevel=3)


_WARNED: set[str] = set()


def task_config(catalog: Catalog, block: Mapping[str, Any], where: str) -> TaskConfig:
    """A task block (``{type: caption, limit: 64}``) validated against its plugin's config."""
    from vlframe.config.files import component_block

    return component_block(catalog, Kind.TASK, block, where)


def settings_block(catalog: Catalog, name: str, settings: Mapping[str, Any], overrides: Sequence[str] = ()) -> TaskConfig:
    """A task config from command-line settings: each ``--flag`` goes to the task's field of that
    name (or of a nested settings block, e.g. the caption task's generation); ``--set K=V`` to any."""
    from vlframe.config.files import apply_overrides

    try:
        config_class = catalog.get(Kind.TASK, name).spec.config
    except VlframeError as exc:
        raise ConfigError([Problem("--task", str(exc))]) from None
    block: dict[str, Any] = {"type": name}
    fields = config_class.model_fields
    for key, value in settings.items():
        if key in fields:
            block[key] = value
            continue
        nested = [f for f, info in fields.items() if isinstance(info.annotation, type)
                  and issubclass(info.annotation, BaseModel) and key in info.annotation.model_fields]
        if not nested:
            allowed = ", ".join(sorted(f for f in fields if f != "type"))
            flag = "--" + key.replace("_", "-")
            raise ConfigError([Problem(flag, f"task '{name}' has no setting '{key}'; its settings: {allowed}")])
        block.setdefault(nested[0], {})[key] = value
    block = apply_overrides(block, overrides)
    return task_config(catalog, block, f"--task {name}")


def periodic_tasks(catalog: Catalog, capabilities: Iterable[str] | None) -> dict[str, TaskConfig]:
    """Every registered task marked ``periodic`` that a model with ``capabilities`` can run (None:
    every periodic task), with its default settings, by name."""
    out = {}
    for entry in catalog.entries(Kind.TASK):
        config_class = entry.spec.config
        if config_class.periodic and (capabilities is None or _why_not(config_class.requires, capabilities) is None):
            out[entry.spec.name] = task_config(catalog, {"type": entry.spec.name}, f"task {entry.spec.name}")
    return out


def run_task(trained: Trained, config: TaskConfig, *, name: str | None = None, out_dir: Path | None = None,
             dataset: Any = None) -> EvalResult:
    """Run one task on ``trained``; the result is named ``name`` (default: the task's type).

    A task whose code raises becomes one :class:`TaskError` line naming it and its plugin (a
    ``ValueError`` is the task's own word on its input, e.g. a dataset without class names).
    ``dataset``: the run's validation split, when already built.
    """
    catalog = trained.registry.catalog
    require_capabilities(trained.model, type(config).requires, f"task '{config.type}'")
    where = f"task {name or config.type} ({config.type} [{catalog.get(Kind.TASK, config.type).plugin}])"
    task = catalog.build(Kind.TASK, config, path=f"task {name or config.type}")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = task.run(TaskContext(trained, out_dir, dataset))
    except VlframeError:
        raise
    except ValueError as exc:
        raise TaskError(f"{where}: {exc}") from exc
    except Exception as exc:
        raise TaskError(f"{where} failed: {one_line(exc)}") from exc
    if not isinstance(result, EvalResult):
        raise TaskError(f"{where} returned {type(result).__name__}, not an EvalResult")
    bad = [k for k, v in result.metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad or not all(isinstance(k, str) and k for k in result.metrics):
        raise TaskError(f"{where} returned metrics that are not numbers: {', '.join(map(str, bad)) or 'a key'}")
    result.metrics = {k: float(v) for k, v in result.metrics.items()}
    _check_items(result, where)
    result.task = name or config.type
    if out_dir is not None and result.items:
        path = out_dir / ITEMS_FILE
        path.write_text(json.dumps(result.items), encoding="utf-8")
        result.files.append(path)
    return result


#: Per-item scores of a result, beside its other files and among its artifacts.
ITEMS_FILE = "items.json"


def _check_items(result: EvalResult, where: str) -> None:
    """Per-item scores must belong to a metric of the result and average to it."""
    for metric, scores in result.items.items():
        if metric not in result.metrics:
            raise TaskError(f"{where} returned per-item scores for '{metric}', which is not one of its metrics")
        values = list(scores.values()) if isinstance(scores, Mapping) else None
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise TaskError(f"{where} returned per-item scores for '{metric}' that are not a mapping of item to number")
        mean = sum(values) / len(values)
        if not math.isclose(mean, result.metrics[metric], rel_tol=1e-4, abs_tol=1e-3):
            raise TaskError(f"{where}: the per-item scores of '{metric}' average {mean:.4f}, not the metric's "
                            f"{result.metrics[metric]:.4f} (items are for metrics that are a mean over items)")


def default_out_dir(trained: Trained, task: str) -> Path:
    from vlframe.runs.folder import unique_name

    return trained.run.eval_dir(unique_name(f"{task}-{trained.checkpoint.name}"))


def log_results(trained: Trained, results: Sequence[EvalResult], folder: Path, *, uri: str | None = None,
                step: int | None = None, extra_metrics: Mapping[str, float] | None = None,
                extra_tags: Mapping[str, str] | None = None) -> TrackingReport:
    """File ``results`` under the training run in its tracking store; report where they went.

    Metrics go to the run as ``eval/<task>/<metric>`` at the checkpoint's step, each result's
    info as the tag ``vlframe.eval.<task>`` and its files as artifacts under ``eval/<task>``. A
    run trained without tracking gets a new run in its experiment, tagged with the checkpoint.
    Everything is journaled in ``folder/tracking`` first: with the store unreachable the lines
    say how to deliver it later (``vlframe tracking sync FOLDER``).
    """
    from vlframe.runs import tags
    from vlframe.runs.tracking import Tracker

    uri = uri or trained.tracking_uri
    step = trained.step if step is None else step
    tracker = Tracker(folder, uri=uri, experiment=trained.config.tracking.experiment, catalog=trained.registry.catalog)
    record = trained.run.record() or {}
    attached = trained.run_id is not None or bool(record.get("local_id"))
    if trained.run_id is not None:
        tracker.start(run_name=trained.run.path.name, run_id=trained.run_id, attach=True)
    elif attached:  # trained while MLflow was unreachable: the run its journal will create
        tracker.start(run_name=record.get("run_name") or trained.run.path.name, attach=True,
                      local_id=record["local_id"])
    else:
        tracker.start(run_name=f"eval-{trained.run.path.name}",
                      tags={tags.CHECKPOINT: str(trained.checkpoint.resolve())})
    metrics = {f"eval/{r.task}/{k}": v for r in results for k, v in r.metrics.items()}
    tracker.log_metrics({**metrics, **dict(extra_metrics or {})}, step=step)
    tracker.set_tags({**{f"{tags.EVAL_PREFIX}{r.task}": json.dumps(r.info, default=str)[:4000] for r in results},
                      **dict(extra_tags or {})})
    for result in results:
        for path in result.files:
            tracker.log_artifact(path, f"eval/{result.task}")
    return tracker.finish(None if attached else "FINISHED")


__all__ = ["ITEMS_FILE", "CapabilityError", "EvalResult", "TaskContext", "default_out_dir", "log_results", "periodic_tasks",
           "run_task", "settings_block", "task_config"]

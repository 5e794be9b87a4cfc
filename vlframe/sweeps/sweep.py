"""Ablation sweeps: variants of one base config, trained and evaluated alike, tracked together.

A sweep file names a base config, overrides shared by every variant (``set``), named variants
(each a set of overrides) and/or grid axes (every combination), and the evaluation tasks every
variant gets. ``vlframe sweep FILE`` opens (or reopens) one tracked parent run for the sweep and
trains each variant in its own process as a child run, tagged with the keys it overrides and
its config hash (which covers the plugins its components come from, so a fixed plugin trains
again). A variant whose hash already finished under this parent is skipped, so an interrupted
sweep resumes where it stopped; a variant that fails is recorded as failed, with its error, and
the sweep goes on.

Each variant is then evaluated by every task of the sweep that applies to it, through the same
dispatcher as ``vlframe eval``; a task the variant cannot run (it lacks the capability) is
recorded with the reason. Every tracking write goes through a journal (the parent's in the sweep
folder, each variant's in its run folder), so a tracking server that goes away mid-sweep loses
nothing: ``vlframe tracking sync`` delivers it later.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from registry import Catalog, ConfigError, ConfigModel, Problem, Registry, RunRecord, TaskConfig, VlframeError, one_line
from registry.protocols import TrackingSink
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.runs import sinks, tags
from vlframe.runs.folder import RunDir, unique_name
from vlframe.runs.lock import FolderLock


class SweepEvaluation(ConfigModel):
    """What every variant is scored on, beyond the validation losses training logs."""

    tasks: dict[str, dict[str, Any]] | None = Field(
        None, description="Task blocks by name (metrics eval/NAME/*), e.g. {caption: {type: caption, limit: 64}}; "
        "none: every registered periodic task (retrieval).")


class SweepConfig(ConfigModel):
    """A sweep file: ``vlframe sweep FILE``."""

    name: str = Field(min_length=1, description="Names the sweep's parent run and its folder.")
    description: str = ""
    base: Path = Field(description="The config every variant starts from (relative to this file).")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for every variant (dotted keys).")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"base": {}}, description="Named variants, each a set of overrides ({} is the base).")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Axes crossed with every variant.")
    seeds: list[int] | None = Field(
        None, min_length=1, description="Train every variant once per seed (train.seed), e.g. [0, 1, 2]: each "
        "variant x seed is a run nested under its variant's run; compare reports means, intervals and tests. "
        "None: one run per variant at its config's seed.")
    evaluation: SweepEvaluation = Field(default_factory=SweepEvaluation)
    output_dir: Path | None = Field(
        None, description="Variant run folders go in OUTPUT_DIR/NAME/; default: sweeps/ in the base config's "
        "train.output_dir (runs/sweeps).")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    seed: int | None = None  # set when the sweep has seeds (then also in overrides as train.seed)
    parent_run: str | None = None  # its MLflow parent: the sweep's run, or its variant's run when seeded
    config: VlframeConfig | None = None
    error: str | None = None
    hash: str | None = None
    registry: Registry | None = None  # with the plugins its own config names

    @property
    def label(self) -> str:
        """The variant, with its seed in a seeded sweep: ``coca/seed1``."""
        return self.name if self.seed is None else f"{self.name}/seed{self.seed}"


@dataclass
class Outcome:
    variant: str
    status: str  # finished | skipped | failed
    run_id: str | None = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """Where a sweep is tracked: the store's URI, the experiment, and the plugins (its sink) of the base config."""

    uri: str
    experiment: str
    catalog: Catalog | None = None

    def tracker(self, folder: Path) -> Any:
        from vlframe.runs.tracking import Tracker

        return Tracker(folder, uri=self.uri, experiment=self.experiment, catalog=self.catalog)

    def sink(self) -> TrackingSink:
        return sinks.sink_for(self.uri, self.catalog)


def load_sweep(path: Path, cli_sets: Sequence[str] = ()) -> SweepConfig:
    """The sweep file ``path``, its base config found; ``cli_sets``: the command line's ``--set``
    (they decide, with the sweep's ``set``, the output folder its runs go in when it names none)."""
    data = configfile.read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(configfile.problems_from(exc, SweepConfig, data, None, str(path))) from None
    if not sweep.base.is_absolute():
        sweep = sweep.model_copy(update={"base": (path.parent / sweep.base).resolve()})
    if not sweep.base.is_file():
        raise ConfigError([Problem("base", f"no such config: {sweep.base}", str(path))])
    if sweep.output_dir is None:  # beside the base config's runs
        train = configfile.compose(sweep.base).get("train") or {}
        data = configfile.apply_overrides(configfile.apply_overrides({"train": train}, sweep.set), cli_sets)
        output = (data.get("train") or {}).get("output_dir")
        sweep = sweep.model_copy(update={"output_dir": Path(output or sinks.DEFAULT_OUTPUT) / "sweeps"})
    return sweep


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def expand(sweep: SweepConfig) -> list[tuple[str, dict[str, Any]]]:
    """(variant name, its overrides): every named variant crossed with every grid point."""
    points: list[dict[str, Any]] = [{}]
    if sweep.grid:
        keys = list(sweep.grid)
        points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    out = []
    for name, overrides in sweep.variants.items():
        for point in points:
            label = name if not point else f"{name}[{','.join(f'{_short(k)}={v}' for k, v in point.items())}]"
            out.append((label, {**overrides, **point}))
    return out


def variant_hash(config: VlframeConfig, registry: Registry) -> str:
    """The config hash of a variant, with the fingerprint of the plugins it uses."""
    return configfile.run_hash(config, registry)


def build_variants(sweep: SweepConfig, sweep_file: Path, *, cli_sets: Sequence[str] = (), steps: int | None = None,
                   only: Sequence[str] = (), seeds: Sequence[int] | None = None) -> tuple[list[Variant], Registry | None]:
    """Validate every variant's config, each with the plugins its own ``plugins:`` section names;
    a variant that does not validate carries its error instead. Returns the variants and the base
    config's registry (for what concerns the sweep as a whole)."""
    base = configfile.compose(sweep.base)
    extra = list(cli_sets) + ([f"train.steps={steps}"] if steps is not None else [])
    configfile.apply_overrides({}, extra)  # a malformed --set is the user's error, before anything runs
    data = configfile.apply_overrides(configfile.apply_overrides(base, sweep.set), extra)
    registry = configfile.registry_for(data, str(sweep.base))
    variants = []
    seeds = list(seeds) if seeds is not None else sweep.seeds
    for name, point in expand(sweep):
        if only and name not in only:
            continue
        for seed in (seeds or [None]):
            overrides = point if seed is None else {**point, "train.seed": seed}
            variants.append(_validated(Variant(name, overrides, seed), base, sweep, sweep_file, extra))
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise ConfigError([Problem("--only", f"no variant {', '.join(unknown)}; variants: "
                                       f"{', '.join(n for n, _ in expand(sweep))}", str(sweep_file))])
    return variants, registry


def _validated(variant: Variant, base: dict[str, Any], sweep: SweepConfig, sweep_file: Path,
               extra: list[str]) -> Variant:
    """``variant`` with its validated config and hash, or the error that stops it."""
    name, overrides = variant.label, variant.overrides
    try:
        data = configfile.apply_overrides(base, {**sweep.set, **overrides})
        data = configfile.apply_overrides(data, extra)
        own = configfile.registry_for(data, f"{sweep_file} (variant {name})")
        variant.config = configfile.validate(data, own, f"{sweep_file} (variant {name})")
        variant.hash = variant_hash(variant.config, own)
        variant.registry = own
    except ConfigError as exc:
        variant.error = "; ".join(exc.lines())
    return variant


def sweep_tasks(sweep: SweepConfig, sweep_file: Path, registry: Registry) -> dict[str, TaskConfig] | None:
    """The sweep's task configs, validated (None: every periodic task, chosen per variant)."""
    from vlframe.evaluation.tasks import task_config

    if sweep.evaluation.tasks is None:
        return None
    return {name: task_config(registry.catalog, block, f"{sweep_file}: evaluation.tasks.{name}")
            for name, block in sweep.evaluation.tasks.items()}


def eval_hash(tasks: dict[str, TaskConfig] | None, registry: Registry) -> str:
    """A short hash of what a variant is evaluated with: the task settings and the task plugins."""
    import hashlib

    from registry import Kind

    if tasks is None:
        blocks: Any = "periodic"
        plugins = {e.plugin for e in registry.catalog.entries(Kind.TASK) if e.spec.config.periodic}
    else:
        blocks = {name: configfile.dump(task) for name, task in tasks.items()}
        plugins = {registry.catalog.get(Kind.TASK, task.type).plugin for task in tasks.values()}
    canonical = json.dumps({"tasks": blocks, "plugins": registry.fingerprint(plugins)}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# -- tracking --------------------------------------------------------------------------------------


def tracking_target(sweep: SweepConfig, cli_sets: Sequence[str] = (), registry: Registry | None = None) -> tuple[str, str]:
    """(tracking URI, experiment) of the sweep: those of its base config (with the sweep's ``set``
    and the command line's ``--set``), by the rule of :mod:`vlframe.runs.sinks`."""
    data = configfile.apply_overrides(configfile.apply_overrides(configfile.compose(sweep.base), sweep.set), cli_sets)
    tracking = data.get("tracking") or {}
    output = Path((data.get("train") or {}).get("output_dir", sinks.DEFAULT_OUTPUT))
    registry = registry or configfile.registry_for(data, str(sweep.base))
    uri = sinks.store_uri(configured=tracking.get("uri"), output_dir=output, catalog=registry.catalog)
    return uri, tracking.get("experiment", "vlframe")


def find_parent(sink: TrackingSink, experiment: str, sweep_name: str) -> str | None:
    """The newest parent run of sweep ``sweep_name`` in ``experiment`` (None: the sweep never ran there)."""
    runs = sink.find_runs(experiment, {tags.SWEEP: sweep_name, tags.SWEEP_PARENT: "true"})
    return runs[0].run_id if runs else None


def children(sink: TrackingSink, parent_id: str) -> list[RunRecord]:
    """Every run of the sweep under ``parent_id``: its children, and (seeded sweeps) the seed runs
    nested under their variant's run; each once."""
    experiment = sink.get_run(parent_id).experiment or None  # a sweep's runs are in its parent's experiment
    found = {}
    for tag in (tags.PARENT, tags.SWEEP_ROOT):
        for run in sink.find_runs(experiment, {tag: parent_id}):
            found[run.run_id] = run
    return list(found.values())


def open_group(sweep: SweepConfig, name: str, parent_id: str, target: Target, known: str | None) -> Any:
    """The run a seeded variant's seed runs nest under (a child of the sweep's parent)."""
    folder = sweep_folder(sweep) / _safe(name) / "variant"
    record = RunDir(folder).record() or {}
    run_id = known or (record.get("run_id") if record.get("uri") == target.uri else None)
    tracker = target.tracker(folder)
    tracker.start(run_name=name, run_id=run_id, tags={tags.PARENT: parent_id, tags.SWEEP_ROOT: parent_id,
                                                      tags.SWEEP: sweep.name, tags.VARIANT: name,
                                                      tags.VARIANT_GROUP: "true"})
    return tracker


def sweep_folder(sweep: SweepConfig) -> Path:
    return Path(sweep.output_dir or sinks.DEFAULT_OUTPUT / "sweeps") / sweep.name


def open_parent(sweep: SweepConfig, sweep_file: Path, target: Target) -> Any:
    """The sweep's parent run, through a tracker in the sweep's folder: the run that folder already
    is in this store, else the newest run tagged with this sweep's name there, else a new one."""
    uri = target.uri
    folder = sweep_folder(sweep) / "parent"
    record = RunDir(folder).record() or {}
    known = record.get("run_id") if record.get("uri") == uri else None
    if known is None:
        try:
            known = find_parent(target.sink(), target.experiment, sweep.name)
        except VlframeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store is down: said below, as when the run cannot open
            raise VlframeError(f"{uri} could not be reached ({type(exc).__name__}): a sweep needs its store to find "
                               "the variants that already finished; nothing was trained") from exc
    tracker = target.tracker(folder)
    tracker.start(run_name=f"sweep-{sweep.name}", run_id=known,
                  tags={tags.SWEEP: sweep.name, tags.SWEEP_PARENT: "true", tags.RUN_DIR: str(sweep_folder(sweep).resolve()),
                        tags.NOTE: sweep.description or f"sweep {sweep.name}"})
    if tracker.run_id is None:
        raise VlframeError(f"{uri} could not be reached ({tracker.reason}): a sweep needs its store to find "
                           "the variants that already finished; nothing was trained")
    if known is None:  # a new parent: file the sweep itself with it
        tracker.log_artifact(sweep_file)
    return tracker


# -- one variant -------------------------------------------------------------------------------


def _child_tags(variant: Variant, sweep: SweepConfig, parent_id: str) -> dict[str, str]:
    out = {tags.PARENT: variant.parent_run or parent_id, tags.SWEEP_ROOT: parent_id, tags.SWEEP: sweep.name,
           tags.VARIANT: variant.name, tags.OVERRIDES: json.dumps(sorted(variant.overrides))}
    if variant.seed is not None:
        out[tags.SEED] = str(variant.seed)
    out.update({f"{tags.OVERRIDE_PREFIX}{k}": json.dumps(v)[:500] for k, v in variant.overrides.items()})
    if variant.hash:
        out[tags.CONFIG_HASH] = variant.hash
    return out


def _record_failure(run_dir: Path, target: Target, variant: Variant, sweep: SweepConfig, parent_id: str,
                    message: str) -> str | None:
    """Mark the variant's run FAILED with the error (creating it when training never opened one)."""
    tracker = target.tracker(run_dir)
    run_id = RunDir(run_dir).run_id
    tracker.start(run_name=variant.label, tags=_child_tags(variant, sweep, parent_id), run_id=run_id,
                  attach=run_id is not None)
    tracker.set_tags({tags.ERROR: message[-4000:]})
    tracker.finish("FAILED")
    return tracker.run_id


def evaluate_variant(run_dir: Path, blocks: dict[str, Any] | None, uri: str,
                     extra_tags: dict[str, str]) -> tuple[dict[str, float], dict[str, str], dict[str, str], Any]:
    """The sweep's evaluation of one trained variant, logged to its run (through a journal), with the
    plugins the variant's own config names: (metrics, skipped tasks with the reason, failed tasks
    with the error, lines saying where it went). One task failing does not stop the others."""
    from registry.protocols import why_not

    from vlframe.evaluation.tasks import log_results, periodic_tasks, run_task, task_config
    from vlframe.inference.trained import load_trained
    from vlframe.runs.journal import journal_metrics

    trained = load_trained(run_dir, precision="auto")
    catalog, capabilities = trained.registry.catalog, trained.model.capabilities
    if blocks is None:
        tasks = periodic_tasks(catalog, capabilities)
    else:
        tasks = {name: task_config(catalog, block, f"evaluation.tasks.{name}") for name, block in blocks.items()}
    skipped = {name: why for name, task in tasks.items() if (why := why_not(type(task).requires, capabilities))}
    folder = trained.run.eval_dir(unique_name("sweep"))
    results, failed = [], {}
    for name, task in tasks.items():
        if name in skipped:
            continue
        try:
            results.append(run_task(trained, task, name=name, out_dir=folder / name))
        except VlframeError as exc:
            failed[name] = " ".join(exc.lines())
    rates = sorted(v for _, v in journal_metrics(run_dir, "train/images_per_s"))
    per_s = statistics.median(rates[len(rates) // 10:]) if rates else float("nan")  # drop the warm-up
    cost = {"cost/params_m": sum(p.numel() for p in trained.model.parameters()) / 1e6,
            "cost/images_per_s": per_s, "cost/s_per_step": trained.config.train.batch_size / per_s}
    done = {} if failed else {tags.SWEEP_DONE: "true"}
    report = log_results(trained, results, folder, uri=uri, extra_metrics=cost,
                        extra_tags={**extra_tags, **done,
                                    **{f"{tags.EVAL_SKIPPED_PREFIX}{n}": why for n, why in skipped.items()}})
    metrics = {f"eval/{r.task}/{k}": v for r in results for k, v in r.metrics.items()}
    return {**metrics, **cost}, skipped, failed, report


def run_sweep(sweep_file: Path, *, cli_sets: Sequence[str] = (), steps: int | None = None, only: Sequence[str] = (),
              seeds: Sequence[int] | None = None, say: Any = print) -> tuple[str, list[Outcome]]:
    """Run (or resume) a sweep; return its parent run id and each variant's (x seed's) outcome.
    ``seeds``: instead of the file's ``seeds``."""
    sweep = load_sweep(sweep_file, cli_sets)
    variants, registry = build_variants(sweep, sweep_file, cli_sets=cli_sets, steps=steps, only=only, seeds=seeds)
    tasks = sweep_tasks(sweep, sweep_file, registry)  # checked once, before anything runs
    blocks = sweep.evaluation.tasks
    scored = eval_hash(tasks, registry)
    uri, experiment = tracking_target(sweep, cli_sets, registry)
    target = Target(uri, experiment, registry.catalog if registry is not None else None)
    sweep_folder(sweep).mkdir(parents=True, exist_ok=True)
    with FolderLock(sweep_folder(sweep), what="running this sweep", hint="then run it again"):  # one process per sweep folder
        return _run_sweep(sweep, sweep_file, variants, blocks, scored, target, say)


def _run_sweep(sweep: SweepConfig, sweep_file: Path, variants: list[Variant], blocks: dict[str, Any] | None,
               scored: str, target: Target, say: Any) -> tuple[str, list[Outcome]]:
    parent = open_parent(sweep, sweep_file, target)
    parent_id = parent.run_id
    names, seeds = {v.name for v in variants}, {v.seed for v in variants if v.seed is not None}
    runs = f"{len(names)} variant(s)" + (f" x {len(seeds)} seed(s)" if seeds else "")
    say(f"sweep {sweep.name}: {runs}; parent run {parent_id} at {target.uri}")
    known = children(target.sink(), parent_id)
    done = {r.tags.get(tags.CONFIG_HASH): r for r in known
            if r.tags.get(tags.SWEEP_DONE) == "true" and r.status == "FINISHED"}
    groups_known = {r.tags.get(tags.VARIANT): r.run_id for r in known if r.tags.get(tags.VARIANT_GROUP) == "true"}
    outcomes = []
    groups: dict[str, Any] = {}
    for variant in variants:
        if variant.seed is not None:  # seed runs nest under their variant's run
            if variant.name not in groups:
                groups[variant.name] = open_group(sweep, variant.name, parent_id, target,
                                                  groups_known.get(variant.name))
            variant.parent_run = groups[variant.name].run_id or parent_id
        run_dir = _variant_folder(sweep, variant)
        if variant.error is not None:
            run_id = _record_failure(run_dir, target, variant, sweep, parent_id, variant.error)
            say(f"[{variant.label}] failed: {variant.error}")
            outcomes.append(Outcome(variant.label, "failed", run_id, variant.error))
            continue
        before = done.get(variant.hash)
        if before is not None and before.tags.get(tags.EVAL_HASH) == scored:
            say(f"[{variant.label}] skipped: finished before as run {before.run_id}")
            outcomes.append(Outcome(variant.label, "skipped", before.run_id))
            continue
        trained_before = before is not None and RunDir(run_dir).run_id == before.run_id
        outcomes.append(_run_variant(variant, sweep, run_dir, parent_id, target, blocks, scored, say,
                                     train=not trained_before))
    for group in groups.values():
        group.finish("FINISHED")
    for line in parent.finish("FINISHED").problems:
        say(line)
    return parent_id, outcomes


def _run_variant(variant: Variant, sweep: SweepConfig, run_dir: Path, parent_id: str, target: Target,
                 blocks: dict[str, Any] | None, scored: str, say: Any, *, train: bool = True) -> Outcome:
    """Train a variant (unless ``train`` is false: it trained before and only its evaluation
    changed), then evaluate it."""
    from vlframe.runs import checkpoint

    began = time.time()
    if train:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = variant.config.model_copy(update={"tracking": variant.config.tracking.model_copy(
            update={"uri": target.uri, "experiment": target.experiment, "run_name": variant.label,
                    "tags": {**variant.config.tracking.tags, **_child_tags(variant, sweep, parent_id)}})})
        config_file = run_dir / "variant.yaml"
        config_file.write_text(configfile.to_yaml(config), encoding="utf-8")
        command = [sys.executable, "-m", "vlframe", "train", str(config_file), "--run-dir", str(run_dir)]
        if checkpoint.find(run_dir) is not None:  # an interrupted earlier attempt: continue it
            command += ["--resume", str(run_dir)]
        say(f"[{variant.label}] training: {' '.join(command[3:])}")
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-3:]
            message = f"training exited with code {proc.returncode}: " + " | ".join(tail)
            run_id = _record_failure(run_dir, target, variant, sweep, parent_id, message)
            say(f"[{variant.label}] failed: {message}")
            return Outcome(variant.label, "failed", run_id, message)
    else:
        say(f"[{variant.label}] trained before; its evaluation changed: evaluating again")
    run_id = RunDir(run_dir).run_id
    try:
        metrics, skipped, failed, report = evaluate_variant(run_dir, blocks, target.uri, {tags.EVAL_HASH: scored})
    except Exception as exc:  # noqa: BLE001 - one variant's evaluation failing must not end the sweep
        message = f"evaluation failed: {one_line(exc, 1000, hint=False)}"
        _record_failure(run_dir, target, variant, sweep, parent_id, message)
        say(f"[{variant.label}] {message}")
        return Outcome(variant.label, "failed", run_id, message)
    shown = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in metrics.items() if not k.startswith("cost/"))
    not_run = "".join(f"; {name} not run ({why})" for name, why in skipped.items())
    for line in report.problems:
        say(f"[{variant.label}] {line}")
    if failed:
        message = "evaluation failed: " + "; ".join(f"{name}: {why}" for name, why in failed.items())
        _record_failure(run_dir, target, variant, sweep, parent_id, message)
        say(f"[{variant.label}] {message} (the other tasks were logged: {shown})")
        return Outcome(variant.label, "failed", run_id, message, metrics)
    say(f"[{variant.label}] finished in {time.time() - began:.0f} s: {shown}{not_run}")
    return Outcome(variant.label, "finished", run_id, metrics=metrics)


def _variant_folder(sweep: SweepConfig, variant: Variant) -> Path:
    """The variant's run folder; a folder holding a checkpoint of another config (the variant was
    edited since) is left alone, and this config gets a folder of its own."""
    from vlframe.runs import checkpoint

    folder = sweep_folder(sweep) / _safe(variant.name)
    if variant.seed is not None:
        folder = folder / f"seed{variant.seed}"
    found = checkpoint.find_readable(folder)[0] if folder.is_dir() else None
    if found is None or variant.hash is None or checkpoint.read_state(found).get("config_hash") == variant.hash:
        return folder
    return folder.with_name(f"{folder.name}-{variant.hash[:8]}")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=.," else "_" for c in name)

"""Ablation sweeps: variants of one base config, trained and evaluated alike, tracked in MLflow.

A sweep file names a base config, overrides shared by every variant (``set``), named variants
(each a set of overrides) and/or grid axes (every combination), and the evaluation every
variant gets. ``vlframe sweep FILE`` opens (or reopens) one MLflow parent run for the sweep and
trains each variant in its own process as a child run, tagged with the keys it overrides and
its config hash. A variant whose config hash already finished under this parent is skipped, so
an interrupted sweep resumes where it stopped; a variant that fails is recorded as failed, with
its error, and the sweep goes on.

Each variant's evaluation is logged to its run: validation losses (from training), retrieval
recall on the validation split, zero-shot top-1 on each named labelled set, caption metrics, and
its cost (parameters, seconds per step, images per second).
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

from registry import ConfigError, ConfigModel, Problem, Registry
from vlframe import configfile
from vlframe.config import VlframeConfig

TAG_SWEEP = "vlframe.sweep"
TAG_VARIANT = "vlframe.variant"
TAG_OVERRIDES = "vlframe.overrides"
TAG_DONE = "vlframe.sweep_done"  # set once a variant trained *and* was evaluated
TAG_ERROR = "vlframe.error"
PARENT = "mlflow.parentRunId"


class ZeroShotSet(ConfigModel):
    """A labelled dataset (a dataset block with class names) and the prompts to classify it with."""

    data: dict[str, Any] = Field(description="A dataset block, e.g. {type: synthetic, label: color, max_objects: 1}.")
    templates: list[str] | None = Field(None, description="Prompt templates with {}; default: vlframe.zeroshot's.")
    limit: int | None = Field(None, gt=0)


class SweepEvaluation(ConfigModel):
    """What every variant is scored on, beyond the validation losses training logs."""

    retrieval_limit: int | None = Field(256, gt=0, description="Validation images for retrieval recall.")
    caption_limit: int | None = Field(64, gt=0, description="Validation images to caption (greedy); 0 skips.")
    caption_metrics: list[str] = Field(default_factory=lambda: ["cider", "bleu4"],
                                       description="Of bleu1-4, meteor, rouge_l, cider.")
    zeroshot: dict[str, ZeroShotSet] = Field(default_factory=dict, description="Labelled sets by name.")


class SweepConfig(ConfigModel):
    """A sweep file: ``vlframe sweep FILE``."""

    name: str = Field(min_length=1, description="Names the sweep's parent run and its folder.")
    description: str = ""
    base: Path = Field(description="The config every variant starts from (relative to this file).")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides for every variant (dotted keys).")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"base": {}}, description="Named variants, each a set of overrides ({} is the base).")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="Axes crossed with every variant.")
    evaluation: SweepEvaluation = Field(default_factory=SweepEvaluation)
    output_dir: Path = Field(Path("runs/sweeps"), description="Variant run folders go in OUTPUT_DIR/NAME/.")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]
    config: VlframeConfig | None = None
    error: str | None = None
    hash: str | None = None


@dataclass
class Outcome:
    variant: str
    status: str  # finished | skipped | failed
    run_id: str | None = None
    message: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def load_sweep(path: Path) -> SweepConfig:
    data = configfile.read_yaml(path)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([Problem(".".join(map(str, e["loc"])), e["msg"], str(path)) for e in exc.errors()]) from None
    if not sweep.base.is_absolute():
        sweep = sweep.model_copy(update={"base": (path.parent / sweep.base).resolve()})
    if not sweep.base.is_file():
        raise ConfigError([Problem("base", f"no such config: {sweep.base}", str(path))])
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


def build_variants(sweep: SweepConfig, sweep_file: Path, *, cli_sets: Sequence[str] = (), steps: int | None = None,
                   only: Sequence[str] = ()) -> tuple[list[Variant], Registry | None]:
    """Validate every variant's config; a variant that does not validate carries its error instead."""
    base = configfile.compose(sweep.base)
    registry = None
    variants = []
    for name, overrides in expand(sweep):
        if only and name not in only:
            continue
        variant = Variant(name, overrides)
        try:
            data = configfile.apply_overrides(base, {**sweep.set, **overrides})
            data = configfile.apply_overrides(data, list(cli_sets) + ([f"train.steps={steps}"] if steps else []))
            registry = registry or configfile.registry_for(data, str(sweep.base))
            variant.config = configfile.validate(data, registry, f"{sweep_file} (variant {name})")
            variant.hash = configfile.config_hash(variant.config)
        except ConfigError as exc:
            variant.error = "; ".join(exc.lines())
        variants.append(variant)
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise ConfigError([Problem("--only", f"no variant {', '.join(unknown)}; variants: "
                                       f"{', '.join(n for n, _ in expand(sweep))}", str(sweep_file))])
    return variants, registry


# -- MLflow ----------------------------------------------------------------------------------------


def tracking_target(sweep: SweepConfig) -> tuple[str, str]:
    """(tracking URI, experiment) of the sweep: those of its base config (with the sweep's ``set``),
    else the embedded store of its output folder."""
    data = configfile.apply_overrides(configfile.compose(sweep.base), sweep.set)
    tracking = data.get("tracking") or {}
    output = Path((data.get("train") or {}).get("output_dir", "runs"))
    uri = tracking.get("uri") or f"sqlite:///{output.resolve() / 'mlflow.db'}"
    return uri, tracking.get("experiment", "vlframe")


def find_parent(client: Any, experiment: str, sweep_name: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_SWEEP}` = '{sweep_name}' "
                              f"and tags.`vlframe.sweep_parent` = 'true'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def children(client: Any, parent_id: str) -> list[Any]:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_id}'",
                              max_results=5000)


def open_parent(client: Any, sweep: SweepConfig, sweep_file: Path, experiment: str) -> str:
    """The sweep's parent run: the newest one with this sweep's name, or a new one."""
    from vlframe.tracking import experiment_id

    parent_id = find_parent(client, experiment, sweep.name)
    if parent_id is None:
        exp_id = experiment_id(client, experiment)
        run = client.create_run(exp_id, run_name=f"sweep-{sweep.name}",
                                tags={TAG_SWEEP: sweep.name, "vlframe.sweep_parent": "true",
                                      "mlflow.note.content": sweep.description or f"sweep {sweep.name}"})
        parent_id = run.info.run_id
        client.log_artifact(parent_id, str(sweep_file))
    else:
        client.update_run(parent_id, status="RUNNING")
    return parent_id


# -- one variant -------------------------------------------------------------------------------


def _record_failure(client: Any, parent_id: str, experiment_id: str, variant: Variant, run_id: str | None,
                    message: str) -> str:
    if run_id is None:  # it failed before training could open its own run
        run = client.create_run(experiment_id, run_name=variant.name,
                                tags={PARENT: parent_id, TAG_VARIANT: variant.name,
                                      TAG_OVERRIDES: json.dumps(sorted(variant.overrides)),
                                      **({"vlframe.config_hash": variant.hash} if variant.hash else {})})
        run_id = run.info.run_id
    client.set_tag(run_id, TAG_ERROR, message[-4000:])
    client.set_terminated(run_id, status="FAILED")
    return run_id


def evaluate_variant(run_dir: Path, sweep: SweepConfig, registry: Registry, uri: str) -> dict[str, float]:
    """The sweep's evaluation of one trained variant, logged to its run; returns the metrics."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from registry import Kind
    from vlframe import evaluation
    from vlframe.pretrained import load_trained

    spec = sweep.evaluation
    trained = load_trained(run_dir, precision="auto", registry=registry)
    model = trained.model
    results = []
    contrastive = getattr(model, "contrastive_pooler", None) is not None and model.text_projection is not None
    if contrastive and spec.retrieval_limit:
        results.append(evaluation.evaluate_retrieval(trained, evaluation.build_dataset(trained, None),
                                                     limit=spec.retrieval_limit))
    if contrastive:
        for name, zs in spec.zeroshot.items():
            config = evaluation.dataset_block(trained, zs.data, f"evaluation.zeroshot.{name}")
            dataset = trained.registry.catalog.build(Kind.DATASET, config, path=f"zeroshot.{name}",
                                                     split="val")
            result = evaluation.evaluate_zeroshot(trained, dataset, templates=zs.templates, limit=zs.limit)
            result.task = f"zeroshot_{name}"
            results.append(result)
    if getattr(model, "multimodal_decoder", None) is not None and spec.caption_limit:
        results.append(evaluation.evaluate_captions(trained, evaluation.build_dataset(trained, None),
                                                    limit=spec.caption_limit, metrics=spec.caption_metrics))
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(trained.run_id, "train/images_per_s") if trained.run_id else []
    rates = sorted(m.value for m in history)[len(history) // 10:] or [float("nan")]  # drop the warm-up
    per_s = statistics.median(rates)
    cost = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "images_per_s": per_s, "s_per_step": trained.config.train.batch_size / per_s}
    metrics = {f"cost/{k}": v for k, v in cost.items()}
    for result in results:
        evaluation.log_result(trained, result, tracking_uri=uri)
        metrics.update({f"eval/{result.task}/{k}": v for k, v in result.metrics.items()})
    now = int(time.time() * 1000)
    client.log_batch(trained.run_id, metrics=[Metric(k, float(v), now, trained.step) for k, v in metrics.items()
                                              if k.startswith("cost/")])
    return metrics


def run_sweep(sweep_file: Path, *, cli_sets: Sequence[str] = (), steps: int | None = None, only: Sequence[str] = (),
              say: Any = print) -> tuple[str, list[Outcome]]:
    """Run (or resume) a sweep; return its parent run id and each variant's outcome."""
    from mlflow import MlflowClient

    sweep = load_sweep(sweep_file)
    variants, registry = build_variants(sweep, sweep_file, cli_sets=cli_sets, steps=steps, only=only)
    uri, experiment = tracking_target(sweep)
    client = MlflowClient(tracking_uri=uri)
    parent_id = open_parent(client, sweep, sweep_file, experiment)
    experiment_id = client.get_run(parent_id).info.experiment_id
    say(f"sweep {sweep.name}: {len(variants)} variant(s); MLflow parent run {parent_id} at {uri}")
    done = {r.data.tags.get("vlframe.config_hash"): r for r in children(client, parent_id)
            if r.data.tags.get(TAG_DONE) == "true" and r.info.status == "FINISHED"}
    folder = sweep.output_dir / sweep.name
    outcomes = []
    for variant in variants:
        if variant.error is not None:
            run_id = _record_failure(client, parent_id, experiment_id, variant, None, variant.error)
            say(f"[{variant.name}] failed: {variant.error}")
            outcomes.append(Outcome(variant.name, "failed", run_id, variant.error))
            continue
        if variant.hash in done:
            say(f"[{variant.name}] skipped: finished before as run {done[variant.hash].info.run_id}")
            outcomes.append(Outcome(variant.name, "skipped", done[variant.hash].info.run_id))
            continue
        outcomes.append(_run_variant(variant, sweep, folder, parent_id, experiment_id, uri, registry, client, say))
    client.set_terminated(parent_id, status="FINISHED")
    return parent_id, outcomes


def _run_variant(variant: Variant, sweep: SweepConfig, folder: Path, parent_id: str, experiment_id: str, uri: str,
                 registry: Registry, client: Any, say: Any) -> Outcome:
    from vlframe import checkpoint

    run_dir = folder / _safe(variant.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = {PARENT: parent_id, TAG_SWEEP: sweep.name, TAG_VARIANT: variant.name,
            TAG_OVERRIDES: json.dumps(sorted(variant.overrides))}
    tags.update({f"vlframe.override.{k}": json.dumps(v)[:500] for k, v in variant.overrides.items()})
    config = variant.config.model_copy(update={"tracking": variant.config.tracking.model_copy(
        update={"uri": uri, "tags": {**variant.config.tracking.tags, **tags}, "run_name": variant.name})})
    config_file = run_dir / "variant.yaml"
    config_file.write_text(configfile.to_yaml(config), encoding="utf-8")
    command = [sys.executable, "-m", "vlframe.cli", "train", str(config_file), "--run-dir", str(run_dir)]
    if checkpoint.find(run_dir) is not None:  # an interrupted earlier attempt: continue it
        command += ["--resume", str(run_dir)]
    say(f"[{variant.name}] training: {' '.join(command[3:])}")
    began = time.time()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_id = _run_id(run_dir)
    if proc.returncode != 0:
        tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-3:]
        message = f"training exited with code {proc.returncode}: " + " | ".join(tail)
        run_id = _record_failure(client, parent_id, experiment_id, variant, run_id, message)
        say(f"[{variant.name}] failed: {message}")
        return Outcome(variant.name, "failed", run_id, message)
    try:
        metrics = evaluate_variant(run_dir, sweep, registry, uri)
    except Exception as exc:  # noqa: BLE001 - one variant's evaluation failing must not end the sweep
        message = f"evaluation failed: {type(exc).__name__}: {exc}"
        _record_failure(client, parent_id, experiment_id, variant, run_id, message)
        say(f"[{variant.name}] {message}")
        return Outcome(variant.name, "failed", run_id, message)
    client.set_tag(run_id, TAG_DONE, "true")
    shown = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}" for k, v in metrics.items() if not k.startswith("cost/"))
    say(f"[{variant.name}] finished in {time.time() - began:.0f} s: {shown}")
    return Outcome(variant.name, "finished", run_id, metrics=metrics)


def _run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "tracking" / "run.json").read_text(encoding="utf-8"))["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_=.," else "_" for c in name)

"""The training loop: set-up, one training step, and a short loop around them.

    Trainer(config, registry, run_dir=...).fit()

:meth:`Trainer.setup` joins the process group, seeds, builds the data, tokenizer and model (through
the one model-building path, ``vlframe.api.build_model``), the optimiser and schedule, restores a
checkpoint when resuming, and opens the tracker. :meth:`Trainer.train_step` is one optimiser step
over ``grad_accum`` micro-batches. :meth:`Trainer.fit` loops, calling the validator, the
checkpointer and the tracker on schedule. Rank 0 alone logs, tracks and writes checkpoints. A
SIGTERM/SIGINT or an error mid-run still leaves a checkpoint to ``--resume`` from.

The model is used only through its contract (:class:`registry.protocols.Model`): ``image_size``,
``context_length``, ``objectives`` (and their ``metrics()``), ``no_weight_decay()``, ``forward``.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from registry import ComponentError, ConfigError, Kind, Problem, Registry, VlframeError
from registry.catalog import one_line
from vlframe.api import build_model, build_tokenizer
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.data.loading import Collate, ImageTextSource, SkipLedger, build_transform, train_loader
from vlframe.runs import checkpoint, store, tags
from vlframe.runs.folder import RunDir
from vlframe.runtime import distributed
from vlframe.runtime.precision import autocast, resolve_precision
from vlframe.training.optim import build_optimizer, build_scheduler
from vlframe.training.validation import Validator


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's logged metrics, by step
    val: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


class Interrupted(VlframeError):
    """Training stopped on a signal; a checkpoint was written."""


class Trainer:
    def __init__(self, config: VlframeConfig, registry: Registry, *, run_dir: Path, resume: Path | None = None,
                 console: Console | None = None) -> None:
        if config.data is None or config.data.train is None:
            raise ConfigError([Problem("data.train", "training needs a dataset (data.train: {type: ...})")])
        if config.tokenizer is None:
            raise ConfigError([Problem("tokenizer", "training needs a tokenizer (tokenizer: {type: ...}; "
                                       "vlframe plugins list --kind tokenizer shows them)")])
        self.config, self.registry, self.resume = config, registry, resume
        self.run = RunDir(run_dir)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.rank, self.step, self.history = 0, 0, []
        self.val_metrics: dict[str, float] = {}
        self._stop_signal: int | None = None

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        t = self.config.train
        status = "FAILED"
        try:
            self.setup()
            with self.progress:
                task = self.progress.add_task("train", total=t.steps, completed=self.step, info="")
                while self.step < t.steps:
                    metrics = self.train_step()
                    self.record(metrics, task)
                    if self._due(t.val_every):
                        self.validate()
                    if self._due(t.checkpoint_every):
                        self.save()
                    if self._stop_signal is not None:
                        raise Interrupted(f"stopped by signal {signal.Signals(self._stop_signal).name} at step {self.step}")
            self.validate()
            final = self.save(final=True)
            status = "FINISHED"
            return TrainResult(self.run.path, self.step, final, self.history, self.val_metrics, self.run_id)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            self._save_what_was_learnt()
            raise
        finally:
            self.close(status)

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; the step's metrics."""
        t, device = self.config.train, self.device
        began = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        for micro in range(t.grad_accum):
            batch = next(self.batches)
            self.ledger.add(batch.skipped)
            last = micro == t.grad_accum - 1
            sync = self.wrapped.no_sync() if (self.world > 1 and not last) else contextlib.nullcontext()
            with sync, self.autocast:
                out = self.wrapped(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
            (out.loss / t.grad_accum).backward()
            sums["loss"] += out.loss.detach().float() / t.grad_accum
            for name, value in out.losses.items():
                sums[f"loss_{name}"] += value.detach().float() / t.grad_accum
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip) if t.grad_clip is not None else None
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - began
        metrics = {f"train/{k}": distributed.all_reduce_mean(v).item() for k, v in sums.items()}
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/images_per_s"] = t.batch_size / elapsed
        if grad_norm is not None:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics.update(objective_metrics(self.model))
        metrics["train/skipped"] = float(self.ledger.count)
        return metrics

    # -- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.config, self.config.train
        self.device = distributed.setup_from_env()
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if t.batch_size % (self.world * t.grad_accum):
            raise ConfigError([Problem("train.batch_size", f"{t.batch_size} does not split into {self.world} rank(s) "
                                                          f"x {t.grad_accum} micro-batch(es)")])
        ckpt, init = self._starting_point()
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)

        catalog = self.registry.catalog
        # The model first: a component that does not build is reported before any work is done.
        self.model = build_model(cfg, registry=self.registry)
        train_data = catalog.build(Kind.DATASET, cfg.data.train, path="data.train", split="train")
        val_data = (catalog.build(Kind.DATASET, cfg.data.val, path="data.val", split="val")
                    if cfg.data.val is not None else None)
        self.precision = resolve_precision(t.precision, self.device)
        self.autocast = autocast(self.precision, self.device)
        self.validator = Validator(cfg, self.registry, self.model, val_data, self.run,
                                   device=self.device, precision=self.precision)
        self.run.create()
        self.tokenizer = self._tokenizer(train_data, ckpt or init)
        self.validator.tokenizer = self.tokenizer
        if init is not None:
            self._initialise(init)
        self.model.to(self.device)
        collate = Collate(self.tokenizer, self.model.context_length)
        source = ImageTextSource(train_data, build_transform(cfg.data, self.model.image_size, train=True),
                                 seed=t.seed, random_caption=True)
        self.ledger = SkipLedger(train_data, cfg.data.max_skip_fraction)
        self.ledger.check()
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.config_hash = configfile.config_hash(cfg, self.plugins)
        run_id = self._restore(ckpt) if ckpt is not None else None
        if self.rank == 0:  # only once resuming succeeded: a failed --resume changes nothing
            self.run.write_config(cfg)
        self.last_saved = self.step if ckpt is not None else -1
        self.wrapped = nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.tracker = self._start_tracking(run_id) if self.rank == 0 and cfg.tracking.enabled else None
        loader = train_loader(source, collate, cfg.data, global_batch=t.batch_size // t.grad_accum, rank=self.rank,
                              world=self.world, seed=t.seed, start_step=self.step * t.grad_accum)
        self.batches = iter(loader)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        self._say(f"{train_data.describe()}; {params:.1f}M parameters; {self.world} rank(s) on {self.device.type}, "
                  f"{self.precision}; run folder {self.run.path}")
        self._previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.progress = Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, disable=self.rank != 0 or not self.console.is_terminal,
        )

    @property
    def plugins(self) -> dict[str, str]:
        """The fingerprint of the plugins this config's components come from."""
        return self.registry.fingerprint(configfile.used_plugins(self.config, self.registry.catalog))

    def _plugins_used(self) -> dict[str, str]:
        """The plugins of the config's components and of the tasks validation runs (for the run's tags)."""
        catalog = self.registry.catalog
        names = configfile.used_plugins(self.config, catalog)
        names |= {catalog.get(Kind.TASK, task.type).plugin for task in self.validator.tasks.values()}
        return self.registry.fingerprint(names)

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else None

    def _starting_point(self) -> tuple[Path | None, Path | None]:
        """The checkpoint to resume from, or the weights to start from (fine-tuning), or neither."""
        t = self.config.train
        if self.resume is not None:
            ckpt = checkpoint.find(self.resume)
            if ckpt is None:
                raise VlframeError(f"--resume {self.resume}: no checkpoint found there")
            return ckpt, None
        if t.init_from is not None:
            init = checkpoint.find(t.init_from)
            if init is None:
                raise ConfigError([Problem("train.init_from", f"{t.init_from}: no checkpoint there (a step_* folder "
                                                             f"with {checkpoint.STATE}, or a run folder)")])
            return None, init
        return None, None

    def _tokenizer(self, train_data: Any, ckpt: Path | None) -> Any:
        cfg = self.config
        # A resumed (or fine-tuned) run reads the tokenizer its checkpoint was trained with.
        saved = ckpt / checkpoint.TOKENIZER if ckpt is not None else None
        own_path = getattr(cfg.tokenizer, "path", None)
        tokenizer = build_tokenizer(cfg, self.registry, saved if saved is not None and saved.is_file()
                                    and own_path is None else None)
        if not tokenizer.trained:
            target = self.run.tokenizer_file
            if self.rank == 0:
                self._say(f"training the tokenizer on the training captions -> {target}")
                tokenizer.train(train_data.captions(), self.run.path)
            distributed.barrier()
            if self.rank != 0:
                tokenizer = build_tokenizer(cfg, self.registry, target)
        return tokenizer

    def _initialise(self, init: Path) -> None:
        """Fine-tuning: start from ``init``'s weights (all of them, or with init_strict off those that fit)."""
        if self.config.train.init_strict:
            try:
                checkpoint.load(init, self.model)
            except (ValueError, RuntimeError) as exc:
                why = " ".join(str(exc).split())[:400]  # torch's message spans lines: keep one problem one line
                raise ConfigError([Problem("train.init_from", f"its weights do not fit the model ({why}); "
                                                             "set train.init_strict: false to take those that fit")]) from None
            self._say(f"initialised from {init}", markup=False)
            return

        def some(names: list[str]) -> str:
            return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""

        fresh, unused = checkpoint.load_fitting(init, self.model)
        self._say(f"initialised from {init}: {len(fresh)} tensors of the model start fresh{some(fresh)}, "
                  f"{len(unused)} of the checkpoint unused{some(unused)}", markup=False)

    def _restore(self, ckpt: Path) -> str | None:
        """Continue from ``ckpt``: weights, optimiser, schedule, step, RNG, skips; return its run id."""
        try:
            state = checkpoint.load(ckpt, self.model, self.optimizer, self.scheduler)
        except KeyError as exc:
            raise VlframeError(f"--resume {ckpt}: not a training checkpoint (no {exc} state); to start from "
                               f"its weights use --set train.init_from={ckpt}") from None
        except (ValueError, RuntimeError) as exc:
            why = " ".join(str(exc).split())[:500]  # torch's message spans lines: one problem, one line
            raise VlframeError(f"--resume {ckpt}: cannot continue this config from it: {why}") from exc
        if state.get("config_hash") not in (None, self.config_hash):
            self._say(f"note: the config (or a plugin it uses) differs from the one {ckpt.name} was trained with "
                      f"(see {ckpt / checkpoint.CONFIG})", markup=False)
        self.step = state["step"]
        checkpoint.set_rng_state(state["rng"])
        for key, reason in state.get("skipped", {}).items():
            self.ledger.reasons.setdefault(key, reason)
        self._say(f"resumed from {ckpt} at step {self.step}")
        return state.get("run_id")

    def _start_tracking(self, run_id: str | None) -> Any:
        from vlframe.runs.tracking import Tracker, flatten

        cfg = self.config
        # A resumed run goes on in the store its folder recorded, unless the config names one.
        recorded = self.run.tracking_uri if run_id is not None else None
        uri = store.store_uri(configured=cfg.tracking.uri or recorded, output_dir=cfg.train.output_dir)
        tracker = Tracker.for_config(cfg.tracking, self.run.path, uri=uri)
        run_tags = {**cfg.tracking.tags, tags.CONFIG_HASH: self.config_hash,
                    tags.RUN_DIR: str(self.run.path.resolve()), tags.PLUGINS: tags.fit_json(self._plugins_used())}
        run_tags.update({f"{tags.VAL_SKIPPED_PREFIX}{name}": why for name, why in self.validator.skipped.items()})
        commit = _git_commit()
        if commit:
            run_tags[tags.GIT_COMMIT] = commit
        tracker.start(run_name=cfg.tracking.run_name or self.run.path.name, params=flatten(configfile.dump(cfg)),
                      tags=run_tags, run_id=run_id)
        if run_id is None:
            tracker.log_artifact(self.run.config_file)
            tracker.log_artifact(self.tokenizer.save(self.run.path))
        return tracker

    # -- pieces of the loop ----------------------------------------------------------------

    def _due(self, every: int | None) -> bool:
        return bool(every) and self.step % every == 0 and self.step < self.config.train.steps

    def record(self, metrics: dict[str, float], task: Any) -> None:
        """Keep, log and show one step's metrics."""
        t = self.config.train
        self.history.append({"step": self.step, **metrics})
        logged = self.step % t.log_every == 0 or self.step == t.steps
        if self.tracker is not None and logged:
            from vlframe.runs.tracking import system_metrics

            self.tracker.log_metrics({**metrics, **system_metrics()}, step=self.step)
        self.progress.update(task, completed=self.step, info=_info(metrics))
        if not self.progress.live.is_started and logged:
            self._say(f"step {self.step}/{t.steps} {_info(metrics)}")

    def validate(self) -> None:
        metrics = self.validator(self.step, self.run_id)
        if metrics:
            self.val_metrics = metrics
            self._say("validation: " + " ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in metrics.items()))
            if self.tracker is not None:
                self.tracker.log_metrics(metrics, step=self.step)

    def save(self, *, final: bool = False) -> Path:
        """Checkpoint this step (rank 0 writes; every rank waits for it)."""
        path = checkpoint.step_folder(self.run.checkpoints, self.step)
        if self.rank == 0:
            path = checkpoint.save(
                self.run.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                extra={"run_id": self.run_id, "skipped": dict(self.ledger.reasons), "config_hash": self.config_hash,
                       "plugins": self.plugins},
                files={checkpoint.CONFIG: configfile.to_yaml(self.config),
                       checkpoint.TOKENIZER: self.tokenizer.save(self.run.path)},
            )
            checkpoint.prune(self.run.checkpoints, self.config.train.keep_checkpoints)
            if final and self.tracker is not None:
                self.tracker.log_artifact(path, "checkpoint")
        distributed.barrier()
        self.last_saved = self.step
        return path

    def _save_what_was_learnt(self) -> None:
        """After an error or a signal: checkpoint the steps since the last checkpoint, say how to resume."""
        if getattr(self, "batches", None) is None:
            return  # failed during set-up: nothing was learnt
        if self.step > self.last_saved and self.step > 0:
            with contextlib.suppress(Exception):
                self.save()
        latest = checkpoint.find(self.run.path)
        if latest is not None:
            self._say(f"stopped after step {self.step}; continue with: vlframe train ... --resume {self.run.path} "
                      f"(newest checkpoint: {latest.name})", markup=False)

    def close(self, status: str) -> None:
        for sig, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, handler)
        if getattr(self, "batches", None) is not None:  # training began: say what the data held
            self._say(f"data: {self.ledger.report()}", markup=False)
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.set_tags({tags.SKIPPED_SAMPLES: str(self.ledger.count)})
            for line in tracker.finish(status):
                self._say(line, markup=False)  # paths and server errors may hold [brackets]
        # After a finished run every rank waits for the others before leaving the group (gloo
        # aborts a process that leaves while another still talks); a failed one leaves at once.
        distributed.teardown(wait=status == "FINISHED")

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _say(self, text: str, *, markup: bool = True) -> None:
        if self.rank == 0:
            self.console.print(text, highlight=False, markup=markup)


def objective_metrics(model: nn.Module) -> dict[str, float]:
    """``{"train/contrastive/temperature": ...}``: what each objective's optional ``metrics()`` reports."""
    out = {}
    for name, objective in getattr(model, "objectives", {}).items():
        report = getattr(objective, "metrics", None)
        if not callable(report):
            continue
        try:
            out.update({f"train/{name}/{key}": float(value) for key, value in report().items()})
        except Exception as exc:  # a plugin's metrics(): say which, on one line
            raise ComponentError(f"model.objectives.{name} ({type(objective).__name__}): metrics() failed: "
                                 f"{one_line(exc)}") from exc
    return out


def _info(metrics: dict[str, float]) -> str:
    parts = [f"{k.removeprefix('train/')} {v:.3f}" for k, v in metrics.items() if k.startswith("train/loss")]
    return " ".join(parts) + f" | {metrics['train/images_per_s']:.1f} img/s lr {metrics['train/lr']:.2e}"


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_run_dir(config_path: Path | None, output_dir: Path) -> Path:
    return RunDir.new(output_dir, config_path.stem if config_path is not None else "run").path


__all__ = ["Interrupted", "TrainResult", "Trainer", "default_run_dir"]

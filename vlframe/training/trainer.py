"""The training loop: set-up, one training step, and a short loop around them.

    Trainer(config, registry, run_dir=...).fit()

:meth:`Trainer.setup` asks the parallel strategy (``train.parallel``) for the process group and
device, builds the data, the tokenizer and the model (through the one model-building path,
``vlframe.api.build_model``, spread by the strategy), the optimiser and schedule, and the
checkpointer, restores a checkpoint when resuming, and opens the run session (its folder, lock
and tracker). :meth:`Trainer.train_step` is one optimiser step over ``grad_accum`` micro-batches.
:meth:`Trainer.fit` loops, calling the validator and the checkpointer on schedule. The parts it
composes, each behind a small interface: :class:`~vlframe.training.session.RunSession`,
:class:`~vlframe.training.checkpointer.Checkpointer`, the ``Stateful`` parts of
:mod:`vlframe.training.state`, a :class:`registry.protocols.ParallelStrategy`, the
:class:`~vlframe.training.validation.Validator` and the :class:`~vlframe.training.display.Display`.

What can go wrong ends in one message (a :class:`registry.VlframeError`) and loses nothing: the
run folder is locked while training, a loss or gradient that is no longer finite stops the run
before the optimiser step (no weight changes, no checkpoint), a full disk or exhausted memory is
said in words with what to change, a SIGTERM/SIGINT or an error mid-run still leaves a checkpoint
to ``--resume`` from, and a set-up that fails leaves no folder behind it created.

The model is used only through its contract (:class:`registry.protocols.Model`).
"""

from __future__ import annotations

import gc
import math
import random
import signal
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from registry import ComponentError, ConfigError, Kind, Problem, Registry, one_line
from vlframe.api import build_model, check_size
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.data.loading import Collate, ImageTextSource, SkipLedger, build_transform, train_loader
from vlframe.data.samples import set_max_image_pixels
from vlframe.nn import recompute
from vlframe.runs import checkpoint
from vlframe.runtime import distributed
from vlframe.runtime.blocks import prepare_blocks
from vlframe.runtime.precision import autocast, resolve_precision
from vlframe.training.checkpointer import Checkpointer, initialise, starting_point
from vlframe.training.display import Display
from vlframe.training.failures import Interrupted, NumericalError, OutOfMemory, in_words
from vlframe.training.optim import build_optimizer, build_scheduler
from vlframe.training.session import RunSession
from vlframe.training.state import DataPosition, RNGState, SchedulerState, TrainState
from vlframe.training.validation import Validator


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0's logged metrics, by step
    val: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None


class Trainer:
    def __init__(self, config: VlframeConfig, registry: Registry, *, run_dir: Path | None = None,
                 resume: Path | None = None, name: str = "run", console: Console | None = None) -> None:
        """``run_dir``: the run folder; default the folder ``resume`` names, else a new one
        ``<train.output_dir>/<name>-<date>-<time>-<hex>``."""
        if config.data is None or config.data.train is None:
            raise ConfigError([Problem("data.train", "training needs a dataset (data.train: {type: ...})")])
        if config.tokenizer is None:
            raise ConfigError([Problem("tokenizer", "training needs a tokenizer (tokenizer: {type: ...}; "
                                       "vlframe plugins list --kind tokenizer shows them)")])
        if config.train.parallel is None:
            why = registry.not_loaded(Kind.PARALLEL)
            raise ConfigError([Problem("train.parallel", "no parallel strategy is named and no plugin offers a default"
                                       f"{'; ' + why if why else ''}; registered: "
                                       f"{registry.catalog.describe(Kind.PARALLEL)}")])
        self.config, self.registry, self.resume = config, registry, resume
        self.display = Display(console, rank=0)
        self.session = RunSession(config, registry, run_dir=run_dir, resume=resume, name=name, display=self.display)
        self.state = TrainState()
        self.history: list[dict[str, float]] = []
        self.val_metrics: dict[str, float] = {}
        self.began = False  # set-up finished: training began
        self.batches: Any = None
        self._stop_signal: int | None = None
        self._handlers: dict[int, Any] = {}

    @property
    def step(self) -> int:
        return self.state.step

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        t = self.config.train
        status = "FAILED"
        try:
            self.setup()
            with self.display.running(t.steps, self.step):
                first = True
                while self.step < t.steps:
                    began = time.perf_counter()
                    metrics = self.train_step()
                    if first and t.compile:  # said once: the compile time is the first step's excess
                        self.display.say(f"torch.compile: the first step took {time.perf_counter() - began:.1f} s "
                                         "(compiling the blocks)")
                    first = False
                    self.record(metrics)
                    if bool(t.val_every) and self.step % t.val_every == 0 and self.step < t.steps:
                        self.validate()
                    if self.checkpointer.due(self.step, t.steps):
                        self.save()
                    # Every rank stops at the same step (a signal may reach ranks either side of a step):
                    # the checkpoint that follows may be collective.
                    stop = distributed.agreed_signal(self._stop_signal)
                    if stop is not None:
                        raise Interrupted(f"stopped by signal {signal.Signals(stop).name} at step {self.step}")
            self.validate()
            final = self.save(final=True)
            status = "FINISHED"
            return TrainResult(self.session.run.path, self.step, final, self.history, self.val_metrics,
                               self.session.run_id)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            translated = in_words(exc, where=self.session.output_dir, step=self.step, batch_size=t.batch_size,
                                  world=distributed.world_size(), grad_accum=t.grad_accum)
            if isinstance(translated, OutOfMemory) and exc.__traceback__ is not None:
                traceback.clear_frames(exc.__traceback__)  # let go of the step's tensors before saving
                gc.collect()
            self._save_what_was_learnt(exc, translated)
            if translated is not exc:
                raise translated from exc
            raise
        finally:
            self.close(status)

    def train_step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; the step's metrics."""
        t, device, strategy = self.config.train, self.device, self.strategy
        began = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        for micro in range(t.grad_accum):
            batch = next(self.batches)
            self.ledger.add(batch.skipped, seen=len(batch.keys))
            with strategy.accumulating(micro == t.grad_accum - 1):
                with self.autocast, recompute.recompute(self.recompute):
                    out = strategy.module(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
                (out.loss / t.grad_accum).backward()
            sums["loss"] += out.loss.detach().float() / t.grad_accum
            for name, value in out.losses.items():
                sums[f"loss_{name}"] += value.detach().float() / t.grad_accum
            del out
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(strategy.clip_grad_norm(params, t.grad_clip))
        names = list(sums)  # one collective and one host sync for all the losses, not one per loss
        averaged = distributed.all_reduce_mean(torch.stack([sums[k] for k in names])).tolist()
        losses = {f"train/{k}": v for k, v in zip(names, averaged)}
        self._check_finite(losses, grad_norm)  # every rank sees the same values: all stop together
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        self.position.step_done()
        metrics = dict(losses)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/images_per_s"] = t.batch_size / (time.perf_counter() - began)
        if t.grad_clip is not None:
            metrics["train/grad_norm"] = grad_norm
        metrics.update(objective_metrics(self.model))
        metrics["train/skipped"] = float(self.ledger.count)
        return metrics

    def _check_finite(self, losses: dict[str, float], grad_norm: float) -> None:
        if all(math.isfinite(v) for v in losses.values()) and math.isfinite(grad_norm):
            return
        shown = ", ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in losses.items())
        what = "the loss" if not all(math.isfinite(v) for v in losses.values()) else "the gradient norm"
        raise NumericalError(
            f"step {self.step + 1}: {what} is not finite ({shown}; gradient norm {grad_norm:.4g}): stopped before the "
            "optimiser step, so no weight changed and no checkpoint was written; lower train.lr, set train.grad_clip "
            "or use train.precision: fp32, then --resume from the newest checkpoint")

    # -- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t, catalog, say = self.config, self.config.train, self.registry.catalog, self.display.say
        self.strategy = catalog.build(Kind.PARALLEL, t.parallel, path="train.parallel")
        self.device = self.strategy.setup()
        rank, world = distributed.rank(), distributed.world_size()
        self.display.rank = rank
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError([Problem("train.batch_size", f"{t.batch_size} does not split into {world} rank(s) "
                                                          f"x {t.grad_accum} micro-batch(es)")])
        self.session.check_tracking()
        ckpt, init = starting_point(self.resume, t.init_from, say)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)
        set_max_image_pixels(cfg.data.max_image_pixels)
        # The model first: a component that does not build (or would not fit) is reported
        # before any work is done, and before anything is written.
        check_size(cfg, self.registry, training=True, device=self.device, shards=self.strategy.shards)
        self.precision = resolve_precision(t.precision, self.device)
        self.recompute = recompute.resolve(t.recompute, self.precision)  # set around each step, not process-wide
        notes = []
        self.model = self.strategy.parallelize(
            lambda device: build_model(cfg, registry=self.registry, device=device),
            lambda model: notes.extend(prepare_blocks(model, compile=t.compile,
                                                      activation_checkpointing=t.activation_checkpointing)),
            device=self.device, seed=t.seed, precision=self.precision)
        train_data = catalog.build(Kind.DATASET, cfg.data.train, path="data.train", split="train")
        val_data = (catalog.build(Kind.DATASET, cfg.data.val, path="data.val", split="val")
                    if cfg.data.val is not None else None)
        self.autocast = autocast(self.precision, self.device)
        self.tokenizer = self.session.saved_tokenizer(ckpt or init)
        run = self.session.claim(ckpt)
        self.validator = Validator(cfg, self.registry, self.model, val_data, strategy=self.strategy,
                                   device=self.device, precision=self.precision)
        self.tokenizer = self.session.trained_tokenizer(self.tokenizer, train_data.captions())
        if init is not None:
            initialise(init, self.model, strict=t.init_strict, say=say)
        self.ledger = SkipLedger(train_data, cfg.data.max_skip_fraction, samples_per_step=t.batch_size // world)
        self.ledger.check()
        self.position = DataPosition(micro_batch=t.batch_size // t.grad_accum, batch_size=t.batch_size)
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.config_hash = configfile.run_hash(cfg, self.registry)
        plugins = self.registry.fingerprint(configfile.used_plugins(cfg, catalog))
        self.checkpointer = Checkpointer(
            run.checkpoints, self.strategy, self.model, self.optimizer,
            [self.state, RNGState(), SchedulerState(self.scheduler), self.ledger, self.position],
            every=t.checkpoint_every, keep=t.keep_checkpoints,
            files=lambda: {checkpoint.CONFIG: configfile.to_yaml(cfg), checkpoint.TOKENIZER: self.session.tokenizer_file},
            identity=lambda: {"run_id": self.session.run_id, "config_hash": self.config_hash, "plugins": plugins,
                              "parallel": t.parallel.type})
        saved = self.checkpointer.restore(ckpt) if ckpt is not None else {}
        same_config = saved.get("config_hash") in (None, self.config_hash)
        if ckpt is not None:
            say(f"resumed from {ckpt} at step {self.step}")
            if saved.get("parallel") not in (None, t.parallel.type):
                say(f"note: {ckpt.name} was written under train.parallel {saved['parallel']}; the run goes on under "
                    f"{t.parallel.type}")
            if not same_config:
                say(f"note: the config (or a plugin it uses) differs from the one {ckpt.name} was trained with "
                    f"(see {ckpt / checkpoint.CONFIG}): steps already logged after it are logged again with the new values")
        self.session.write_config()  # only once resuming succeeded: a failed --resume changes nothing
        self.session.track(run_id=saved.get("run_id"), config_hash=self.config_hash, same_config=same_config,
                           resumed_from=ckpt, skipped_tasks=self.validator.skipped,
                           plugins=self.session.plugins_used(task.type for task in self.validator.tasks.values()))
        source = ImageTextSource(train_data, build_transform(cfg.data, self.model.image_size, train=True),
                                 seed=t.seed, random_caption=True)
        loader = train_loader(source, Collate(self.tokenizer, self.model.context_length), cfg.data,
                              global_batch=t.batch_size // t.grad_accum, rank=rank, world=world, seed=t.seed,
                              start_step=self.position.micro_batches)
        self.batches = iter(loader)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6  # a DTensor counts whole
        say(f"{train_data.describe()}; {params:.1f}M parameters; {world} rank(s) on {self.device.type}, "
            f"{self.precision}; run folder {run.path}")
        for note in [*notes, *self.strategy.notes]:
            say(note)
        self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self.began = True

    # -- pieces of the loop ----------------------------------------------------------------

    def record(self, metrics: dict[str, float]) -> None:
        """Keep, log and show one step's metrics."""
        t = self.config.train
        self.history.append({"step": self.step, **metrics})
        logged = self.step % t.log_every == 0 or self.step == t.steps
        tracker = self.session.tracker
        if tracker is not None and logged:
            from vlframe.runs.tracking import system_metrics

            tracker.log_metrics({**metrics, **system_metrics()}, step=self.step)
        self.display.show(self.step, t.steps, metrics, logged=logged)

    def validate(self) -> None:
        metrics = self.validator(self.step, run=self.session.run, run_id=self.session.run_id, tokenizer=self.tokenizer)
        if metrics:
            self.val_metrics = metrics
            self.display.say("validation: " + " ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in metrics.items()))
            if self.session.tracker is not None:
                self.session.tracker.log_metrics(metrics, step=self.step)

    def save(self, *, final: bool = False) -> Path:
        """Checkpoint this step (every rank takes part); the final one is also a tracked artifact."""
        path = self.checkpointer.save(self.step)
        if final and self.session.tracker is not None:
            self.session.tracker.log_artifact(path, "checkpoint")
        return path

    def _save_what_was_learnt(self, exc: BaseException, translated: BaseException) -> None:
        """After an error or a signal: checkpoint the steps since the last checkpoint (not those of a
        blown-up step), and say how to resume."""
        if not self.began:
            return  # failed during set-up: nothing was learnt
        if not isinstance(translated, NumericalError):
            self.checkpointer.save_after(self.step, signalled=isinstance(exc, (Interrupted, KeyboardInterrupt)))
        latest = self.session.run.newest_checkpoint()
        if latest is not None:
            self.display.say(f"stopped after step {self.step}; continue with: vlframe train ... --resume "
                             f"{self.session.run.path} (newest checkpoint: {latest.name})")

    def close(self, status: str) -> None:
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        # The loader's worker processes end with the run, not whenever the garbage collector gets to
        # them (possibly inside a later import, holding its lock while they are joined).
        self.batches = None
        if self.began:  # say what the data held
            self.display.say(f"data: {self.ledger.report()}")
        self.session.close(status, set_up=self.began, skipped=self.ledger.count if self.began else None)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum


def objective_metrics(model: torch.nn.Module) -> dict[str, float]:
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


__all__ = ["Interrupted", "NumericalError", "OutOfMemory", "TrainResult", "Trainer"]

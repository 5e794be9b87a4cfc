"""The training loop: set-up, one training step, and a short loop around them.

    Trainer(config, registry, run_dir=...).fit()

:meth:`Trainer.setup` joins the process group, seeds, builds the data, tokenizer and model (through
the one model-building path, ``vlframe.api.build_model``), the optimiser and schedule, restores a
checkpoint when resuming, and opens the tracker. :meth:`Trainer.train_step` is one optimiser step
over ``grad_accum`` micro-batches. :meth:`Trainer.fit` loops, calling the validator, the
checkpointer and the tracker on schedule. Rank 0 alone logs, tracks and writes checkpoints. A
SIGTERM/SIGINT or an error mid-run still leaves a checkpoint to ``--resume`` from.

What can go wrong ends in one message (a :class:`registry.VlframeError`) and loses nothing: the
run folder is locked while training (a second writer is refused), a loss or gradient that is no
longer finite stops the run before the optimiser step (no weight changes, no checkpoint), a full
disk or exhausted memory is said in words with what to change, and a set-up that fails leaves
no folder behind it created.

The model is used only through its contract (:class:`registry.protocols.Model`): ``image_size``,
``context_length``, ``objectives`` (and their ``metrics()``), ``no_weight_decay()``, ``forward``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import re
import shutil
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
import traceback
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from registry import ComponentError, ConfigError, Kind, Problem, Registry, VlframeError
from registry.catalog import one_line
from vlframe.api import build_model, build_tokenizer, check_size
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.data.loading import Collate, ImageTextSource, SkipLedger, build_transform, train_loader
from vlframe.data.samples import set_max_image_pixels
from vlframe.runs import checkpoint, sharded, store, tags
from vlframe.runs.folder import RunDir
from vlframe.runtime import distributed
from vlframe.runtime.parallel import gather_names, spread
from vlframe.nn import recompute
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


class NumericalError(VlframeError):
    """The loss or the gradients stopped being finite; training stopped before the optimiser step."""


class OutOfMemory(VlframeError):
    """An allocation failed while training (the message says at which batch size, and what to change)."""


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
        self.config, self.registry, self.resume, self.name = config, registry, resume, name
        if run_dir is None and resume is not None:
            run_dir = RunDir.of(resume).path  # continue in the folder it came from
        self.run: RunDir | None = RunDir(run_dir) if run_dir is not None else None
        self._lock, self._created, self._set_up = None, False, False
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
                first = True
                while self.step < t.steps:
                    began = time.perf_counter()
                    metrics = self.train_step()
                    if first and t.compile:  # said once: the compile time is the first step's excess
                        self._say(f"torch.compile: the first step took {time.perf_counter() - began:.1f} s "
                                  "(compiling the blocks)", markup=False)
                    first = False
                    self.record(metrics, task)
                    if self._due(t.val_every):
                        self.validate()
                    if self._due(t.checkpoint_every):
                        self.save()
                    # Every rank stops at the same step (a signal may reach ranks either side of a step):
                    # the checkpoint that follows is collective under FSDP.
                    stop = distributed.agreed_signal(self._stop_signal)
                    if stop is not None:
                        raise Interrupted(f"stopped by signal {signal.Signals(stop).name} at step {self.step}")
            self.validate()
            final = self.save(final=True)
            status = "FINISHED"
            return TrainResult(self.run.path, self.step, final, self.history, self.val_metrics, self.run_id)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            translated = self._in_words(exc)
            if isinstance(translated, OutOfMemory) and exc.__traceback__ is not None:
                traceback.clear_frames(exc.__traceback__)  # let go of the step's tensors before saving
                gc.collect()
            # The weights of a blown-up step are not saved. A sharded save needs every rank: only
            # a signal (which reaches them all) is sure to find them all here.
            collective = getattr(getattr(self, "parallel", None), "sharded", False)
            if not isinstance(translated, NumericalError) and (
                    not collective or isinstance(exc, (Interrupted, KeyboardInterrupt))):
                self._save_what_was_learnt()
            else:
                self._point_to_newest()
            if translated is not exc:
                raise translated from exc
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
            self.ledger.add(batch.skipped, seen=len(batch.keys))
            last = micro == t.grad_accum - 1
            with self.parallel.accumulating(last):
                with self.autocast, recompute.recompute(self.recompute):
                    out = self.wrapped(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
                (out.loss / t.grad_accum).backward()
            sums["loss"] += out.loss.detach().float() / t.grad_accum
            for name, value in out.losses.items():
                sums[f"loss_{name}"] += value.detach().float() / t.grad_accum
            del out
        self.parallel.finish_backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = self.parallel.clip(params, t.grad_clip)
        losses = {f"train/{k}": distributed.all_reduce_mean(v).item() for k, v in sums.items()}
        self._check_finite(losses, float(grad_norm))  # every rank sees the same values: all stop together
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        elapsed = time.perf_counter() - began
        metrics = dict(losses)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        metrics["train/images_per_s"] = t.batch_size / elapsed
        if t.grad_clip is not None:
            metrics["train/grad_norm"] = float(grad_norm)
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

    def _in_words(self, exc: BaseException) -> BaseException:
        """A full disk or exhausted memory as the message a user can act on (else ``exc`` itself)."""
        t = self.config.train
        if not isinstance(exc, VlframeError) and checkpoint.no_space(exc):
            where = Path(getattr(exc, "filename", None) or (self.run.path if self.run is not None else t.output_dir))
            return checkpoint.DiskFullError(f"no space left on the device writing {where} "
                                            f"({checkpoint.free_space(where) / 2**20:.0f} MiB free there): free some "
                                            "space, then --resume; the checkpoints written before are intact")
        if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and _out_of_memory(exc)):
            micro = t.batch_size // (self.world * t.grad_accum)
            return OutOfMemory(
                f"out of memory at step {self.step + 1} ({_allocation(exc)}) with train.batch_size {t.batch_size} "
                f"({self.world} rank(s) x {t.grad_accum} micro-batch(es) of {micro}): lower train.batch_size, or keep "
                f"it and raise train.grad_accum (e.g. {t.grad_accum * 2}) so each micro-batch needs less memory")
        return exc

    # -- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t = self.config, self.config.train
        self.device = distributed.setup_from_env(group=t.parallel == "fsdp")
        self.rank, self.world = distributed.rank(), distributed.world_size()
        if t.batch_size % (self.world * t.grad_accum):
            raise ConfigError([Problem("train.batch_size", f"{t.batch_size} does not split into {self.world} rank(s) "
                                                          f"x {t.grad_accum} micro-batch(es)")])
        ckpt, init = self._starting_point()
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)

        set_max_image_pixels(cfg.data.max_image_pixels)
        catalog = self.registry.catalog
        # The model first: a component that does not build (or would not fit) is reported
        # before any work is done, and before anything is written.
        check_size(cfg, self.registry, training=True, device=self.device,
                   shards=self.world if t.parallel == "fsdp" else 1)
        self.precision = resolve_precision(t.precision, self.device)
        # What the forward recomputes in backward, set around each step (not process-wide).
        self.recompute = recompute.resolve(t.recompute, self.precision)
        self.model, self.parallel = spread(lambda device: build_model(cfg, registry=self.registry, device=device),
                                           t, self.device, world=self.world, precision=self.precision)
        train_data = catalog.build(Kind.DATASET, cfg.data.train, path="data.train", split="train")
        val_data = (catalog.build(Kind.DATASET, cfg.data.val, path="data.val", split="val")
                    if cfg.data.val is not None else None)
        self.autocast = autocast(self.precision, self.device)
        self.tokenizer = self._saved_tokenizer(ckpt or init)
        self.run = self._claim_folder(ckpt)
        self.validator = Validator(cfg, self.registry, self.model, val_data, self.run, device=self.device,
                                   precision=self.precision, collective=self.parallel.sharded)
        self.tokenizer = self._trained_tokenizer(train_data)
        self.validator.tokenizer = self.tokenizer
        if init is not None:
            self._initialise(init)
        collate = Collate(self.tokenizer, self.model.context_length)
        source = ImageTextSource(train_data, build_transform(cfg.data, self.model.image_size, train=True),
                                 seed=t.seed, random_caption=True)
        self.ledger = SkipLedger(train_data, cfg.data.max_skip_fraction)
        self.ledger.check()
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.config_hash = configfile.config_hash(cfg, self.plugins)
        run_id = self._restore(ckpt) if ckpt is not None else None
        self._resumed_from = ckpt
        if ckpt is not None and self.ledger.streaming:  # a stream's fraction counts from the start of the run
            self.ledger.size = self.step * t.batch_size // self.world
        if self.rank == 0:  # only once resuming succeeded: a failed --resume changes nothing
            self.run.write_config(cfg)
        self.last_saved = self.step if ckpt is not None else -1
        self.wrapped = self.parallel.module
        self.tracker = self._start_tracking(run_id) if self.rank == 0 and cfg.tracking.enabled else None
        loader = train_loader(source, collate, cfg.data, global_batch=t.batch_size // t.grad_accum, rank=self.rank,
                              world=self.world, seed=t.seed, start_step=self.step * t.grad_accum)
        self.batches = iter(loader)
        self._set_up = True
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        if self.parallel.sharded:
            params = sum(p.numel() for p in self.model.parameters()) / 1e6  # DTensors count whole
        self._say(f"{train_data.describe()}; {params:.1f}M parameters; {self.world} rank(s) on {self.device.type}, "
                  f"{self.precision}; run folder {self.run.path}")
        for note in self.parallel.notes:
            self._say(note, markup=False)
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
            ckpt, passed = checkpoint.find_readable(self.resume)
            if ckpt is None:
                why = f": {'; '.join(passed)}" if passed else ""
                raise VlframeError(f"--resume {self.resume}: no {'readable ' if passed else ''}checkpoint there{why}")
            for line in passed:  # a truncated or corrupt newer checkpoint: say so, use the one before
                self._say(f"note: {line}", markup=False)
            return ckpt, None
        if t.init_from is not None:
            init, passed = checkpoint.find_readable(t.init_from)
            if init is None:
                why = "; ".join(passed) or (f"no checkpoint there (a step_* folder with {checkpoint.STATE}, "
                                            "or a run folder)")
                raise ConfigError([Problem("train.init_from", f"{t.init_from}: {why}")])
            for line in passed:
                self._say(f"note: {line}", markup=False)
            return None, init
        return None, None

    def _claim_folder(self, resumed: Path | None) -> RunDir:
        """The run folder, made (a new one unless named) and locked by rank 0, and known to every rank.

        A fresh run is refused in a folder holding checkpoints (it would mix two runs there); a
        run resumed from ``resumed`` moves the checkpoints newer than it aside (a branch it leaves,
        or checkpoints that could not be read), so that neither resuming nor pruning picks them."""
        path, problem = None, None
        if self.rank == 0:
            try:
                path = str(self._claim_on_rank0(resumed).path)
            except VlframeError as exc:
                problem = exc
        # Every rank learns the outcome: an error on rank 0 alone would leave the others waiting.
        path, message = distributed.broadcast_object((path, None if problem is None else " ".join(problem.lines())))
        if problem is not None:
            raise problem
        if message is not None:  # rank 0's error, said by this rank too
            raise VlframeError(message)
        return RunDir(path)

    def _claim_on_rank0(self, resumed: Path | None) -> RunDir:
        run = self.run
        if run is None:
            run, self._created = RunDir.new(self.config.train.output_dir, self.name), True
        else:
            try:
                run.path.parent.mkdir(parents=True, exist_ok=True)
                run.path.mkdir()  # exclusive: only a folder this process made is ever removed by it
                self._created = True
            except FileExistsError:
                if not run.path.is_dir():
                    raise VlframeError(f"{run.path}: cannot be the run folder: it is a file") from None
            except OSError as exc:
                raise VlframeError(f"{run.path}: cannot be the run folder ({exc.strerror})") from None
        lock = run.lock()
        note = lock.acquire()
        self._lock = lock
        if note:
            self._say(f"note: {note}", markup=False)
        if run.checkpoints.is_dir():
            checkpoint.sweep_partial(run.checkpoints)  # a writer killed mid-save: free its space now
        if self.resume is None:
            found = checkpoint.find(run.path)
            if found is not None:
                raise VlframeError(f"{run.path} holds the checkpoints of an earlier run (newest {found.name}): "
                                   f"continue it with --resume {run.path}, or train in another folder")
            if run.record() is not None:  # an earlier attempt that never reached a checkpoint
                old = run.tracking.with_name(f"{run.tracking.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                run.tracking.rename(old)
                self._say(f"note: starting over in {run.path}: the tracking journal of an earlier attempt "
                          f"(no checkpoint) moved to {old.name}/", markup=False)
        elif resumed is not None and resumed.parent.resolve() == run.checkpoints.resolve():
            newer = [c for c in checkpoint.candidates(run.path) if checkpoint.step_of(c) > checkpoint.step_of(resumed)]
            if newer:
                aside = run.checkpoints / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
                aside.mkdir()
                for ckpt in newer:
                    ckpt.rename(aside / ckpt.name)
                self._say(f"note: {', '.join(c.name for c in newer)} (newer than {resumed.name}) moved to "
                          f"{aside.relative_to(run.path)}/: this run goes on from {resumed.name}", markup=False)
        return run

    def _saved_tokenizer(self, ckpt: Path | None) -> Any:
        """The config's tokenizer; a resumed (or fine-tuned) run's is the one its checkpoint holds."""
        saved = ckpt / checkpoint.TOKENIZER if ckpt is not None else None
        own_file = self.config.tokenizer.path  # registry.TokenizerConfig: the config names its own file
        return build_tokenizer(self.config, self.registry, saved if saved is not None and saved.is_file()
                               and own_file is None else None)

    def _trained_tokenizer(self, train_data: Any) -> Any:
        """The tokenizer, trained on the training captions when it is not yet; saved in the run folder."""
        tokenizer = self.tokenizer
        if not tokenizer.trained:
            target = self.run.tokenizer_file
            if self.rank == 0:
                self._say(f"training the tokenizer on the training captions -> {target}")
                try:
                    tokenizer.train(train_data.captions(), self.run.path)
                except (VlframeError, OSError):
                    raise
                except Exception as exc:  # the plugin's word on why: one line naming it
                    raise ComponentError(f"tokenizer ({self.config.tokenizer.type}): training failed: "
                                         f"{one_line(exc)}") from exc
            distributed.barrier()
            if self.rank != 0:
                tokenizer = build_tokenizer(self.config, self.registry, target)
        # Saved once: every checkpoint copies this file.
        self.tokenizer_file = tokenizer.save(self.run.path) if self.rank == 0 else self.run.tokenizer_file
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
        except (ValueError, RuntimeError, TypeError, IndexError) as exc:
            why = " ".join(str(exc).split())[:500]  # torch's message spans lines: one problem, one line
            raise VlframeError(f"--resume {ckpt}: cannot continue this config from it: {why}") from exc
        self._same_config = state.get("config_hash") in (None, self.config_hash)
        if not self._same_config:
            self._say(f"note: the config (or a plugin it uses) differs from the one {ckpt.name} was trained with "
                      f"(see {ckpt / checkpoint.CONFIG}): steps already logged after it are logged again with the "
                      "new values", markup=False)
        try:
            self.step = int(state["step"])
            checkpoint.set_rng_state(state["rng"])
            for key, reason in dict(state.get("skipped", {})).items():
                self.ledger.reasons.setdefault(str(key), str(reason))
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise VlframeError(f"--resume {ckpt}: its state is malformed ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:200]})") from None
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
        resumed = getattr(self, "_resumed_from", None)
        tracker.start(run_name=cfg.tracking.run_name or self.run.path.name, params=flatten(configfile.dump(cfg)),
                      tags=run_tags, run_id=run_id, once_per_step=getattr(self, "_same_config", True),
                      logged_in=[RunDir.of(resumed).path] if resumed is not None else [])
        if run_id is None:
            tracker.log_artifact(self.run.config_file)
            tracker.log_artifact(self.tokenizer_file)
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
        # Every rank checks (their weights are the same): all stop together, none waits alone.
        bad = [name for name, p in self.model.named_parameters()
               if not torch.isfinite(p.to_local() if self.parallel.sharded and hasattr(p, "to_local") else p).all()]
        if self.parallel.sharded:  # each rank sees its shards only
            bad = gather_names(bad)
        if bad:  # never over the last good checkpoint
            raise NumericalError(f"step {self.step}: the weight {bad[0]} is not finite: not checkpointed")
        extra = {"run_id": self.run_id, "skipped": dict(self.ledger.reasons), "config_hash": self.config_hash,
                 "plugins": self.plugins}
        files = {checkpoint.CONFIG: configfile.to_yaml(self.config), checkpoint.TOKENIZER: self.tokenizer_file}
        if self.parallel.sharded:  # every rank writes its shards
            path = sharded.save(self.run.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                                extra=extra, files=files)
            if self.rank == 0:
                checkpoint.prune(self.run.checkpoints, self.config.train.keep_checkpoints)
                if final and self.tracker is not None:
                    self.tracker.log_artifact(path, "checkpoint")
        elif self.rank == 0:
            path = checkpoint.save(self.run.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                                   extra=extra, files=files)
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
        self._point_to_newest()

    def _point_to_newest(self) -> None:
        latest = checkpoint.find(self.run.path) if getattr(self, "batches", None) is not None else None
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
            try:
                tracker.set_tags({tags.SKIPPED_SAMPLES: str(self.ledger.count)})
                for line in tracker.finish(status):
                    self._say(line, markup=False)  # paths and server errors may hold [brackets]
            except OSError as exc:  # a full disk: the journal could not take the run's end
                self._say(f"the end of the run ({status}) could not be journaled in {self.run.tracking} "
                          f"({exc.strerror}); once there is space, resume or: vlframe tracking sync {self.run.path}",
                          markup=False)
        if self._lock is not None:
            # A set-up that failed leaves nothing behind: a folder this process made and still
            # holds, with no checkpoint or journal in it, goes (before the lock does).
            if not self._set_up and self._created and tracker is None and checkpoint.find(self.run.path) is None:
                shutil.rmtree(self.run.path, ignore_errors=True)
            self._lock.release()
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


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


def _allocation(exc: BaseException) -> str:
    """What could not be allocated, from the allocator's message."""
    text = str(exc)
    if isinstance(exc, MemoryError):
        return "Python could not allocate memory"
    found = re.search(r"tried to allocate (\d+) bytes", text)
    if found:
        return f"the CPU allocator could not get {int(found.group(1)) / 2**30:.2f} GiB more"
    found = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text)
    if found:
        return f"the GPU could not give {found.group(1)} more"
    return " ".join(text.split())[:200]


__all__ = ["Interrupted", "NumericalError", "OutOfMemory", "TrainResult", "Trainer"]

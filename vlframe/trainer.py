"""The training loop: one class, readable top to bottom.

    Trainer(config, registry, run_dir=...).fit()

sets up (process group, seeds, data, tokenizer, model, optimiser), optionally resumes from a
checkpoint, then for each step: forward/backward over ``grad_accum`` micro-batches, clip, step,
log, validate and checkpoint on schedule. Rank 0 alone logs, tracks and writes checkpoints.
A SIGTERM/SIGINT or an error mid-run still leaves a checkpoint to ``--resume`` from.
"""

from __future__ import annotations

import contextlib
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

from registry import ConfigError, Kind, Problem, Registry, VlframeError
from vlframe import checkpoint, configfile, distributed
from vlframe.api import build_tokenizer
from vlframe.config import VlframeConfig
from vlframe.data import Collate, ImageTextSource, SkipLedger, build_transform, eval_loader, train_loader
from vlframe.metrics import retrieval_recall
from vlframe.optim import build_optimizer, build_scheduler


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
        self.config, self.registry, self.run_dir, self.resume = config, registry, Path(run_dir), resume
        self.console = console or Console(stderr=True, soft_wrap=True)
        self._stop_signal: int | None = None

    # -- set-up ----------------------------------------------------------------------------

    def _say(self, text: str, *, markup: bool = True) -> None:
        if self.rank == 0:
            self.console.print(text, highlight=False, markup=markup)

    def _build_tokenizer(self, train_data: Any, ckpt: Path | None) -> Any:
        cfg = self.config
        # A resumed (or fine-tuned) run reads the tokenizer its checkpoint was trained with.
        saved = ckpt / "tokenizer.model" if ckpt is not None else None
        from_ckpt = saved if saved is not None and saved.is_file() and getattr(cfg.tokenizer, "path", None) is None else None
        tokenizer = build_tokenizer(cfg, self.registry, from_ckpt)
        if not tokenizer.trained:
            target = self.run_dir / "tokenizer.model"
            if self.rank == 0:
                self._say(f"training the tokenizer on the training captions -> {target}")
                tokenizer.train(train_data.captions(), self.run_dir)
            distributed.barrier()
            if self.rank != 0:
                tokenizer = build_tokenizer(cfg, self.registry, target)
        return tokenizer

    def _initialise(self, model: nn.Module, init: Path) -> None:
        """Fine-tuning: start from ``init``'s weights (all of them, or with init_strict off those that fit)."""
        if self.config.train.init_strict:
            try:
                checkpoint.load(init, model)
            except (ValueError, RuntimeError) as exc:
                why = " ".join(str(exc).split())[:400]  # torch's message spans lines: keep one problem one line
                raise ConfigError([Problem("train.init_from", f"its weights do not fit the model ({why}); "
                                                             "set train.init_strict: false to take those that fit")]) from None
            self._say(f"initialised from {init}", markup=False)
            return

        def some(names: list[str]) -> str:
            return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""

        fresh, unused = checkpoint.load_fitting(init, model)
        self._say(f"initialised from {init}: {len(fresh)} tensors of the model start fresh{some(fresh)}, "
                  f"{len(unused)} of the checkpoint unused{some(unused)}", markup=False)

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, t = self.config, self.config.train
        device = distributed.setup_from_env()
        self.rank, world = distributed.rank(), distributed.world_size()
        if t.batch_size % (world * t.grad_accum):
            raise ConfigError([Problem("train.batch_size", f"{t.batch_size} does not split into {world} rank(s) "
                                                          f"x {t.grad_accum} micro-batch(es)")])
        ckpt = init = None
        if self.resume is not None:
            ckpt = checkpoint.find(self.resume)
            if ckpt is None:
                raise VlframeError(f"--resume {self.resume}: no checkpoint found there")
        elif t.init_from is not None:
            init = checkpoint.find(t.init_from)
            if init is None:
                raise ConfigError([Problem("train.init_from", f"{t.init_from}: no checkpoint there (a step_* folder "
                                                             f"with {checkpoint.STATE}, or a run folder)")])
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        np.random.seed(t.seed)

        catalog = self.registry.catalog
        train_data = catalog.build(Kind.DATASET, cfg.data.train, path="data.train", split="train")
        val_data = (catalog.build(Kind.DATASET, cfg.data.val, path="data.val", split="val")
                    if cfg.data.val is not None else None)
        tokenizer = self._build_tokenizer(train_data, ckpt or init)
        model = catalog.build(Kind.MODEL, cfg.model, path="model", catalog=catalog)
        if init is not None:
            self._initialise(model, init)
        model = model.to(device)
        image_size = model.image_encoder.image_size
        collate = Collate(tokenizer, cfg.model.context_length)
        source = ImageTextSource(train_data, build_transform(cfg.data, image_size, train=True),
                                 seed=t.seed, random_caption=True)
        ledger = SkipLedger(train_data, cfg.data.max_skip_fraction)
        ledger.check()

        optimizer = build_optimizer(model, t)
        scheduler = build_scheduler(optimizer, t)
        step, run_id = 0, None
        if ckpt is not None:
            try:
                state = checkpoint.load(ckpt, model, optimizer, scheduler)
            except KeyError as exc:
                raise VlframeError(f"--resume {ckpt}: not a training checkpoint (no {exc} state); to start from "
                                   f"its weights use --set train.init_from={ckpt}") from None
            except (ValueError, RuntimeError) as exc:
                raise VlframeError(f"--resume {ckpt}: cannot continue this config from it: {exc}") from exc
            if state.get("config_hash") not in (None, configfile.config_hash(cfg)):
                self._say(f"note: the config differs from the one {ckpt.name} was trained with "
                          f"(see {ckpt / 'config.yaml'})", markup=False)
            step, run_id = state["step"], state.get("run_id")
            checkpoint.set_rng_state(state["rng"])
            for key, reason in state.get("skipped", {}).items():
                ledger.reasons.setdefault(key, reason)
            self._say(f"resumed from {ckpt} at step {step}")
        ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model

        tracking = self.rank == 0 and cfg.tracking.enabled
        tracker = self._start_tracking(run_id, tokenizer) if tracking else None
        loader = train_loader(source, collate, cfg.data, global_batch=t.batch_size // t.grad_accum, rank=self.rank,
                              world=world, seed=t.seed, start_step=step * t.grad_accum)
        batches = iter(loader)
        precision = resolve_precision(t.precision, device)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        self._say(f"{train_data.describe()}; {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
                  f"{world} rank(s) on {device.type}, {precision}; run folder {self.run_dir}")

        history: list[dict[str, float]] = []
        val_metrics: dict[str, float] = {}
        last_saved = step if ckpt is not None else -1
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        progress = self._progress()
        status = "FAILED"
        try:
            with progress:
                task = progress.add_task("train", total=t.steps, completed=step, info="")
                while step < t.steps:
                    began = time.perf_counter()
                    model.train()
                    optimizer.zero_grad(set_to_none=True)
                    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
                    for micro in range(t.grad_accum):
                        batch = next(batches)
                        ledger.add(batch.skipped)
                        last = micro == t.grad_accum - 1
                        sync = ddp.no_sync() if (world > 1 and not last) else contextlib.nullcontext()
                        with sync, autocast:
                            out = ddp(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
                        (out.loss / t.grad_accum).backward()
                        sums["loss"] += out.loss.detach().float() / t.grad_accum
                        for name, value in out.losses.items():
                            sums[f"loss_{name}"] += value.detach().float() / t.grad_accum
                    grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                                 if t.grad_clip is not None else None)
                    optimizer.step()
                    scheduler.step()
                    step += 1
                    elapsed = time.perf_counter() - began

                    metrics = {f"train/{k}": distributed.all_reduce_mean(v).item() for k, v in sums.items()}
                    metrics["train/lr"] = scheduler.get_last_lr()[0]
                    metrics["train/images_per_s"] = t.batch_size / elapsed
                    if grad_norm is not None:
                        metrics["train/grad_norm"] = float(grad_norm)
                    for name, objective in model.objectives.items():
                        if hasattr(objective, "temperature"):
                            metrics["train/temperature"] = float(objective.temperature)
                    metrics["train/skipped"] = float(ledger.count)
                    history.append({"step": step, **metrics})
                    if tracker is not None and (step % t.log_every == 0 or step == t.steps):
                        from vlframe.tracking import system_metrics

                        tracker.log_metrics({**metrics, **system_metrics()}, step=step)
                    progress.update(task, completed=step, info=self._info(metrics))
                    if not progress.live.is_started and self.rank == 0 and (step % t.log_every == 0 or step == t.steps):
                        self._say(f"step {step}/{t.steps} {self._info(metrics)}")

                    if val_data is not None and t.val_every and step % t.val_every == 0 and step < t.steps:
                        val_metrics = self._validate(model, val_data, tokenizer, collate, device, autocast)
                        if tracker is not None:
                            tracker.log_metrics(val_metrics, step=step)
                    if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                        self._save(step, model, optimizer, scheduler, tokenizer, tracker, ledger)
                        last_saved = step
                    if self._stop_signal is not None:
                        raise Interrupted(f"stopped by signal {signal.Signals(self._stop_signal).name} at step {step}")

            if val_data is not None:
                val_metrics = self._validate(model, val_data, tokenizer, collate, device, autocast)
                if tracker is not None:
                    tracker.log_metrics(val_metrics, step=step)
            final = self._save(step, model, optimizer, scheduler, tokenizer, tracker, ledger, final=True)
            last_saved = step
            status = "FINISHED"
            return TrainResult(self.run_dir, step, final, history, val_metrics, tracker.run_id if tracker else None)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            if step > last_saved and step > 0:  # keep what was learnt since the last checkpoint
                with contextlib.suppress(Exception):
                    self._save(step, model, optimizer, scheduler, tokenizer, tracker, ledger)
            latest = checkpoint.find(self.run_dir)
            if latest is not None:
                self._say(f"stopped after step {step}; continue with: vlframe train ... --resume {self.run_dir} "
                          f"(newest checkpoint: {latest.name})", markup=False)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._say(f"data: {ledger.report()}", markup=False)
            if tracker is not None:
                tracker.set_tags({"vlframe.skipped_samples": str(ledger.count)})
                for line in tracker.finish(status):
                    self._say(line, markup=False)  # paths and server errors may hold [brackets]
            distributed.teardown()

    # -- pieces of the loop ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, disable=self.rank != 0 or not self.console.is_terminal,
        )

    @staticmethod
    def _info(metrics: dict[str, float]) -> str:
        parts = [f"{k.removeprefix('train/')} {v:.3f}" for k, v in metrics.items() if k.startswith("train/loss")]
        return " ".join(parts) + f" | {metrics['train/images_per_s']:.1f} img/s lr {metrics['train/lr']:.2e}"

    def _start_tracking(self, run_id: str | None, tokenizer: Any) -> Any:
        from vlframe.tracking import Tracker, flatten

        cfg = self.config
        root = cfg.train.output_dir.resolve()
        root.mkdir(parents=True, exist_ok=True)
        tracker = Tracker(cfg.tracking, self.run_dir, default_uri=f"sqlite:///{root / 'mlflow.db'}")
        data = configfile.dump(cfg)
        (self.run_dir / "config.yaml").write_text(configfile.to_yaml(cfg), encoding="utf-8")
        tags = {**cfg.tracking.tags, "vlframe.config_hash": configfile.config_hash(cfg),
                "vlframe.run_dir": str(self.run_dir.resolve())}
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        tracker.start(run_name=cfg.tracking.run_name or self.run_dir.name, params=flatten(data), tags=tags,
                      run_id=run_id)
        if run_id is None:
            tracker.log_artifact(self.run_dir / "config.yaml")
            tracker.log_artifact(tokenizer.save(self.run_dir))
        return tracker

    def _save(self, step: int, model: nn.Module, optimizer: Any, scheduler: Any, tokenizer: Any, tracker: Any,
              ledger: SkipLedger, *, final: bool = False) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{step:06d}"
        if self.rank == 0:
            path = checkpoint.save(
                self.run_dir / "checkpoints", step, model, optimizer, scheduler,
                extra={"run_id": tracker.run_id if tracker else None, "skipped": dict(ledger.reasons),
                       "config_hash": configfile.config_hash(self.config)},
                files={"config.yaml": configfile.to_yaml(self.config), "tokenizer.model": tokenizer.save(self.run_dir)},
            )
            checkpoint.prune(self.run_dir / "checkpoints", self.config.train.keep_checkpoints)
            if final and tracker is not None:
                tracker.log_artifact(path, "checkpoint")
        distributed.barrier()
        return path

    @torch.no_grad()
    def _validate(self, model: nn.Module, val_data: Any, tokenizer: Any, collate: Collate, device: torch.device,
                  autocast: Any) -> dict[str, float]:
        """Validation losses and retrieval recall on rank 0 (the other ranks wait)."""
        metrics: dict[str, float] = {}
        if self.rank == 0:
            cfg = self.config
            model.eval()
            source = ImageTextSource(val_data, build_transform(cfg.data, model.image_encoder.image_size, train=False),
                                     seed=cfg.train.seed, random_caption=False)
            loader = eval_loader(source, collate, cfg.data, batch=max(1, cfg.train.batch_size // cfg.train.grad_accum))
            totals: dict[str, float] = defaultdict(float)
            count = 0
            image_embeds, text_embeds, owners = [], [], []
            with distributed.local_only(), autocast:
                for batch in loader:
                    out = model(batch.images.to(device), batch.text.to(device), batch.text_mask.to(device))
                    n = len(batch.keys)
                    totals["val/loss"] += out.loss.item() * n
                    for name, value in out.losses.items():
                        totals[f"val/loss_{name}"] += value.item() * n
                    if out.image_embeds is not None and out.text_embeds is not None:
                        image_embeds.append(out.image_embeds.float().cpu())
                        captions = [c for caps in batch.all_captions for c in caps]
                        owners += [count + i for i, caps in enumerate(batch.all_captions) for _ in caps]
                        text, mask = tokenizer.encode(captions, cfg.model.context_length)
                        text_embeds.append(model.encode_text(text.to(device), mask.to(device)).float().cpu())
                    count += n
            metrics = {k: v / max(count, 1) for k, v in totals.items()}
            if image_embeds:
                recall = retrieval_recall(torch.cat(image_embeds), torch.cat(text_embeds), torch.tensor(owners))
                metrics.update({f"val/{k}": v for k, v in recall.items()})
            self._say("validation: " + " ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in metrics.items()))
        distributed.barrier()
        return metrics


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where bf16 matmuls run natively (there they are 2-5x faster), else ``fp32``."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return "bf16" if native else "fp32"


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_run_dir(config_path: Path | None, output_dir: Path) -> Path:
    stem = config_path.stem if config_path is not None else "run"
    return output_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


__all__ = ["Interrupted", "TrainResult", "Trainer", "default_run_dir"]

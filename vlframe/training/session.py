"""A training run's session: its folder and lock, its tokenizer file, its tracker; opened at set-up,
closed at the end however the run ends.

The folder is claimed by rank 0 (made, or reused when named, and locked: a second writer is
refused) and every rank learns the outcome, so an error there stops them all. A fresh run is
refused in a folder holding checkpoints; a resumed one moves aside the checkpoints newer than
the one it resumes from. A set-up that fails leaves no folder behind that it created.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from registry import ComponentError, Kind, Registry, VlframeError, one_line
from vlframe.api import build_tokenizer
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.runs import checkpoint, sinks, tags
from vlframe.runs.folder import RunDir
from vlframe.runs.tracking import Tracker, TrackingReport, flatten
from vlframe.runtime import distributed
from vlframe.training.display import Display


class RunSession:
    """The run folder (``run``), its lock, the tokenizer file, and the tracker (rank 0's)."""

    def __init__(self, config: VlframeConfig, registry: Registry, *, run_dir: Path | None, resume: Path | None,
                 name: str, display: Display) -> None:
        if run_dir is None and resume is not None:
            run_dir = RunDir.of(resume).path  # continue in the folder it came from
        self.config, self.registry, self.resume, self.name, self.display = config, registry, resume, name, display
        self.run: RunDir | None = RunDir(run_dir) if run_dir is not None else None
        self.tracker: Tracker | None = None
        self.tokenizer_file: Path | None = None
        self._lock: Any = None
        self._created = False

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id if self.tracker is not None else None

    @property
    def output_dir(self) -> Path:
        return self.run.path if self.run is not None else self.config.train.output_dir

    # -- the folder ------------------------------------------------------------------------------

    def claim(self, resumed: Path | None) -> RunDir:
        """The run folder, made (a new one unless named) and locked by rank 0, known to every rank."""
        path, problem = None, None
        if distributed.rank() == 0:
            try:
                path = str(self._claim_on_rank0(resumed).path)
            except VlframeError as exc:
                problem = exc
            except OSError as exc:  # a full disk, a read-only folder: said on every rank, not left waiting
                problem = VlframeError(f"{self.output_dir}: cannot be the run folder ({exc.strerror or exc})")
        # Every rank learns the outcome: an error on rank 0 alone would leave the others waiting.
        path, message = distributed.broadcast_object((path, None if problem is None else " ".join(problem.lines())))
        if problem is not None:
            raise problem
        if message is not None:  # rank 0's error, said by this rank too
            raise VlframeError(message)
        self.run = RunDir(path)
        return self.run

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
        self.run = run
        lock = run.lock()
        note = lock.acquire()
        self._lock = lock
        if note:
            self.display.say(f"note: {note}")
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
                self.display.say(f"note: starting over in {run.path}: the tracking journal of an earlier attempt "
                                 f"(no checkpoint) moved to {old.name}/")
        elif resumed is not None and resumed.parent.resolve() == run.checkpoints.resolve():
            newer = [c for c in checkpoint.candidates(run.path) if checkpoint.step_of(c) > checkpoint.step_of(resumed)]
            if newer:
                aside = run.checkpoints / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
                aside.mkdir()
                for ckpt in newer:
                    ckpt.rename(aside / ckpt.name)
                self.display.say(f"note: {', '.join(c.name for c in newer)} (newer than {resumed.name}) moved to "
                                 f"{aside.relative_to(run.path)}/: this run goes on from {resumed.name}")
        return run

    def write_config(self) -> None:
        if distributed.rank() == 0:
            self.run.write_config(self.config)

    # -- the tokenizer ---------------------------------------------------------------------------

    def saved_tokenizer(self, ckpt: Path | None) -> Any:
        """The config's tokenizer; a resumed (or fine-tuned) run's is the one its checkpoint holds."""
        saved = ckpt / checkpoint.TOKENIZER if ckpt is not None else None
        own_file = self.config.tokenizer.path  # registry.TokenizerConfig: the config names its own file
        return build_tokenizer(self.config, self.registry, saved if saved is not None and saved.is_file()
                               and own_file is None else None)

    def trained_tokenizer(self, tokenizer: Any, captions: Iterable[str]) -> Any:
        """``tokenizer``, trained on the training captions when it is not yet; saved in the run folder
        (every checkpoint copies that file)."""
        if not tokenizer.trained:
            target = self.run.tokenizer_file
            if distributed.rank() == 0:
                self.display.say(f"training the tokenizer on the training captions -> {target}")
                try:
                    tokenizer.train(captions, self.run.path)
                except (VlframeError, OSError):
                    raise
                except Exception as exc:  # the plugin's word on why: one line naming it
                    raise ComponentError(f"tokenizer ({self.config.tokenizer.type}): training failed: "
                                         f"{one_line(exc)}") from exc
            distributed.barrier()
            if distributed.rank() != 0:
                tokenizer = build_tokenizer(self.config, self.registry, target)
        self.tokenizer_file = tokenizer.save(self.run.path) if distributed.rank() == 0 else self.run.tokenizer_file
        return tokenizer

    # -- tracking ------------------------------------------------------------------------------

    def check_tracking(self) -> None:
        """A URI no tracking sink serves is said before anything is written (by every rank: each
        stops, none is left waiting for rank 0)."""
        cfg = self.config
        if cfg.tracking.enabled:
            uri = sinks.store_uri(configured=cfg.tracking.uri, output_dir=cfg.train.output_dir,
                                  catalog=self.registry.catalog)
            sinks.sink_entry(uri, self.registry.catalog)

    def track(self, *, run_id: str | None, config_hash: str, same_config: bool, resumed_from: Path | None,
              plugins: Mapping[str, str], skipped_tasks: Mapping[str, str]) -> None:
        """Open the tracked run (rank 0; a resumed run reopens ``run_id``), with the run's params and tags."""
        cfg = self.config
        if distributed.rank() != 0 or not cfg.tracking.enabled:
            return
        # A resumed run goes on in the store its folder recorded, unless the config names one.
        recorded = self.run.tracking_uri if run_id is not None else None
        catalog = self.registry.catalog
        uri = sinks.store_uri(configured=cfg.tracking.uri or recorded, output_dir=cfg.train.output_dir, catalog=catalog)
        tracker = Tracker.for_config(cfg.tracking, self.run.path, uri=uri, catalog=catalog)
        run_tags = {**cfg.tracking.tags, tags.CONFIG_HASH: config_hash, tags.RUN_DIR: str(self.run.path.resolve()),
                    tags.PLUGINS: tags.fit_json(dict(plugins))}
        run_tags.update({f"{tags.VAL_SKIPPED_PREFIX}{name}": why for name, why in skipped_tasks.items()})
        commit = _git_commit()
        if commit:
            run_tags[tags.GIT_COMMIT] = commit
        self.tracker = tracker
        tracker.start(run_name=cfg.tracking.run_name or self.run.path.name, params=flatten(configfile.dump(cfg)),
                      tags=run_tags, run_id=run_id, once_per_step=same_config,
                      logged_in=[RunDir.of(resumed_from).path] if resumed_from is not None else [])
        if run_id is None:
            tracker.log_artifact(self.run.config_file)
            tracker.log_artifact(self.tokenizer_file)

    def plugins_used(self, task_types: Iterable[str]) -> dict[str, str]:
        """The fingerprint of the config's plugins and of the tasks validation runs (the run's tags)."""
        catalog = self.registry.catalog
        names = configfile.used_plugins(self.config, catalog)
        names |= {catalog.get(Kind.TASK, task).plugin for task in task_types}
        return self.registry.fingerprint(names)

    # -- the end ---------------------------------------------------------------------------------

    def close(self, status: str, *, set_up: bool, skipped: int | None) -> None:
        """End the tracked run with ``status``, release the folder, leave the process group. A set-up
        that failed leaves nothing behind: a folder this process made, with no checkpoint or journal
        in it, goes (before the lock does)."""
        tracker = self.tracker
        if tracker is not None:
            try:
                if skipped is not None:
                    tracker.set_tags({tags.SKIPPED_SAMPLES: str(skipped)})
                report: TrackingReport = tracker.finish(status)
                for line in report:
                    self.display.say(line)
            except OSError as exc:  # a full disk: the journal could not take the run's end
                self.display.say(f"the end of the run ({status}) could not be journaled in {self.run.tracking} "
                                 f"({exc.strerror}); once there is space, resume or: vlframe tracking sync {self.run.path}")
        if self._lock is not None:
            if not set_up and self._created and tracker is None and checkpoint.find(self.run.path) is None:
                shutil.rmtree(self.run.path, ignore_errors=True)
            self._lock.release()
        # After a finished run every rank waits for the others before leaving the group (gloo
        # aborts a process that leaves while another still talks); a failed one leaves at once.
        distributed.teardown(wait=status == "FINISHED")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


__all__ = ["RunSession"]

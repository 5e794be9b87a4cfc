"""The run folder: one type owns its layout, so no command computes paths inside it.

    RUN/
      config.yaml            the resolved config (always written, tracked or not)
      tokenizer.model        the tokenizer the run trains with
      checkpoints/step_NNNNNN/   a checkpoint (see vlframe.runs.checkpoint)
      tracking/              the tracking journal: journal.jsonl, delivered.json, run.json
      eval/NAME/             evaluations of the run's checkpoints (each with its own tracking/)
      .lock                  while a process trains here: which one (see vlframe.runs.lock)
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vlframe.runs import checkpoint, journal
from vlframe.runs.lock import FolderLock


def unique_name(stem: str) -> str:
    """``<stem>-<date>-<time>-<4 hex>``: a folder name that two processes starting in the same
    second do not share (create it exclusively where that must be certain)."""
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class RunDir:
    """A run's folder (which need not exist yet)."""

    CONFIG = "config.yaml"
    TOKENIZER = checkpoint.TOKENIZER
    CHECKPOINTS = checkpoint.FOLDER
    TRACKING = journal.FOLDER
    EVAL = "eval"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @classmethod
    def new(cls, output_dir: Path, stem: str) -> RunDir:
        """A folder of its own under ``output_dir``, created here: ``<stem>-<date>-<time>-<4 hex>``.

        Created exclusively, so two runs started in the same second never share one."""
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        while True:
            path = Path(output_dir) / unique_name(stem)
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return cls(path)

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run folder of ``path``: itself, or the run a checkpoint folder belongs to."""
        path = Path(path)
        if checkpoint.is_checkpoint(path) and path.parent.name == cls.CHECKPOINTS:
            return cls(path.parent.parent)
        return cls(path)

    # -- the layout ------------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def tokenizer_file(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def tracking(self) -> Path:
        return self.path / self.TRACKING

    def eval_dir(self, name: str) -> Path:
        return self.path / self.EVAL / name

    # -- contents --------------------------------------------------------------------------

    def create(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def lock(self) -> FolderLock:
        """The folder's lock (``.lock``), held by the process that trains in it."""
        return FolderLock(self.path)

    def write_config(self, config: BaseModel) -> Path:
        """Write the resolved config (atomically)."""
        from vlframe.config.files import to_yaml

        self.create()
        tmp = self.config_file.with_name(f".{self.CONFIG}.tmp")
        try:
            tmp.write_text(to_yaml(config), encoding="utf-8")
            tmp.replace(self.config_file)
        finally:  # a full disk leaves no partial file behind
            tmp.unlink(missing_ok=True)
        return self.config_file

    def newest_checkpoint(self) -> Path | None:
        return checkpoint.find(self.path)

    def record(self) -> dict[str, Any] | None:
        """Where the run is tracked, as the tracker recorded it (``tracking/run.json``): uri,
        experiment, run id; None for a run never tracked (or an unreadable record)."""
        try:
            data = json.loads((self.tracking / journal.RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @property
    def run_id(self) -> str | None:
        record = self.record() or {}
        value = record.get("run_id")
        return value if isinstance(value, str) else None

    @property
    def tracking_uri(self) -> str | None:
        record = self.record() or {}
        value = record.get("uri")
        return value if isinstance(value, str) else None

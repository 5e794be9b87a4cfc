"""A tracked folder's journal: every tracking event, appended before any sink sees it.

``FOLDER/tracking/`` holds:
  journal.jsonl   one JSON event a line (the event kinds: :class:`registry.protocols.TrackingSink`)
  delivered.json  how many journal lines the sink already has (rewritten atomically)
  run.json        where the run lives: uri, experiment, run id (null until the sink has the run)

Nothing here knows a tracking backend: the journal is read back by :mod:`vlframe.runs.tracking`
(delivery), by sweeps (a variant's throughput) and by anyone who wants a run's metrics without
asking the store.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: The folder, inside the folder a tracker is given, that holds its journal and its record of the run.
FOLDER = "tracking"
RUN_FILE = "run.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON; a crash mid-write leaves the previous version, never a truncated file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:  # a full disk leaves no partial file behind
        tmp.unlink(missing_ok=True)


def parse_event(line: str) -> dict:
    """One journal line as an event; ``{}`` for a line that is not a JSON object."""
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


class Journal:
    """The ``tracking/`` folder of a run (or evaluation, or sweep) folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "journal.jsonl"
        self._delivered_path = folder / "delivered.json"
        self._run_path = folder / RUN_FILE
        self._file: Any = None
        self.lines = 0  # lines in the journal, counted by read() then kept up by append()

    @classmethod
    def of(cls, folder: Path) -> Journal:
        """The journal of a tracked folder (``folder/tracking``)."""
        return cls(Path(folder) / FOLDER)

    def read(self, start: int) -> list[dict]:
        """The events from line ``start`` on.

        A line that is not a JSON object (the tail of a crash mid-write) stays as ``{}`` so
        that line numbers, which delivered.json counts, keep their meaning.
        """
        events: list[dict] = []
        self.lines = 0
        if self.path.exists():
            with self.path.open(encoding="utf-8", errors="replace") as lines:
                for self.lines, line in enumerate(lines, 1):
                    if self.lines > start:
                        events.append(parse_event(line))
        return events

    def append(self, events: Sequence[dict]) -> None:
        if self._file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            cut_short = self._ends_mid_line()
            self._file = self.path.open("a", encoding="utf-8")
            if cut_short:  # end the line a crash cut short, or it would swallow the first new event
                self._file.write("\n")
        self._file.write("".join(json.dumps(e) + "\n" for e in events))
        self.lines += len(events)
        self._file.flush()  # in the OS before delivery is tried; fsync would cost too much per step

    def _ends_mid_line(self) -> bool:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return False
        with self.path.open("rb") as raw:
            raw.seek(-1, os.SEEK_END)
            return raw.read(1) != b"\n"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def delivered(self) -> int:
        try:
            return int(json.loads(self._delivered_path.read_text(encoding="utf-8"))["lines"])
        except FileNotFoundError:
            return 0

    def set_delivered(self, lines: int) -> None:
        write_json_atomic(self._delivered_path, {"lines": lines})

    def read_run(self) -> dict | None:
        try:
            return json.loads(self._run_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def write_run(self, info: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._run_path, info)

    def metrics(self, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every ``key`` metric journaled: read from the file, whether or not
        any store ever got them."""
        return [(int(e["step"]), float(e["value"])) for e in self.read(0)
                if e.get("kind") == "metric" and e.get("key") == key]


def journal_metrics(folder: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every ``key`` metric journaled in ``folder/tracking``."""
    return Journal.of(folder).metrics(key)


__all__ = ["FOLDER", "Journal", "RUN_FILE", "journal_metrics", "parse_event", "write_json_atomic"]

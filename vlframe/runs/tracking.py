"""Tracking that never stalls training and never loses an event, to any tracking sink.

Every event (param, tag, metric, artifact, status) is first appended to a journal in the run
folder (:mod:`vlframe.runs.journal`), then delivered to the sink serving the run's tracking URI
(:mod:`vlframe.runs.sinks`; MLflow is the built-in one) in journal order. When the sink cannot be
reached, training goes on, delivery is retried at most every ``RETRY_AFTER_S`` seconds, and
``sync`` (the command ``vlframe tracking sync FOLDER``) delivers whatever is left later.

A tracker keeps its journal in ``FOLDER/tracking/``: a training run's folder, an evaluation's
folder (its results go to the training run it evaluated), a sweep's folder (its parent run).
Delivery is at least once, which is safe because every sink takes an event it already has without
harm (the contract: :class:`registry.protocols.TrackingSink`).

No tracking library is imported here: a sink imports its own, when it first delivers.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry import Catalog
from registry.protocols import TrackingSink
from vlframe.runs import sinks
from vlframe.runs.journal import FOLDER, RUN_FILE, Journal, journal_metrics  # noqa: F401 - re-exported
from vlframe.runs.sinks import TrackingError

if TYPE_CHECKING:
    from vlframe.config.root import TrackingConfig

# After a failed delivery, wait this long before trying again: a dead server then costs one
# timeout per RETRY_AFTER_S, not one per training step.
RETRY_AFTER_S = 30.0
# The timeout sync uses when the environment sets none: nothing waits on it, artifacts may be big.
SYNC_TIMEOUT_S = 30.0
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


def flatten(data: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as tracking params: ``{"train.lr": "0.0005", ...}``. Lists are kept whole,
    as their JSON text (a sink drops what its store cannot hold: the resolved config is an
    artifact too)."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
            continue
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(value, default=str)
        else:
            text = str(value)
        flat[name] = text
    return flat


def system_metrics() -> dict[str, float]:
    """CPU and memory use of this machine and process, to log next to the training metrics."""
    try:
        import psutil
    except ImportError:  # optional: tracking works without it
        return {}
    return {
        # Usage since the previous call; the first call of a process reports 0.
        "system/cpu_percent": float(psutil.cpu_percent(interval=None)),
        "system/memory_rss_gb": psutil.Process().memory_info().rss / 2**30,
        "system/memory_used_percent": float(psutil.virtual_memory().percent),
    }


def _now_ms() -> int:
    return int(time.time() * 1000)


def short_reason(exc: BaseException) -> str:
    """Why a delivery failed, in a few words (``connection refused``, ``timed out``, ...)."""
    text = str(exc).strip()
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("timeout", "timed out"), ("Name or service not known", "unknown host")):
        if needle in text:
            return short
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


@dataclass
class TrackingReport:
    """How a tracker ended: where the run is (``where``) and what went wrong (``problems``:
    events the store refused, events left in the journal with how to deliver them)."""

    where: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    undelivered: int = 0

    @property
    def lines(self) -> list[str]:
        return [*self.where, *self.problems]

    def __iter__(self):  # the lines, for callers that show them all
        return iter(self.lines)


class _Outbox:
    """A run's undelivered journal events and the sink run they go to."""

    def __init__(self, folder: Path, timeout_s: float, catalog: Catalog | None):
        self.journal = Journal(folder)
        self.timeout_s = timeout_s
        self.catalog = catalog
        self.info: dict | None = self.journal.read_run()
        self.pending: list[dict] = []
        self._sink: TrackingSink | None = None

    def load(self) -> None:
        """Picks up the events an earlier process journaled but did not deliver."""
        self.pending = self.journal.read(self.journal.delivered())

    def record(self, events: Sequence[dict]) -> None:
        self.journal.append(events)
        self.pending.extend(events)

    def sink(self) -> TrackingSink:
        if self._sink is None or self._sink.uri != self.info["uri"]:
            self._sink = sinks.sink_for(self.info["uri"], self.catalog, timeout_s=self.timeout_s)
        return self._sink

    def ensure_run(self) -> str:
        if self.info["run_id"] is None:
            info = self.info
            info["run_id"], info["experiment_id"] = self.sink().create_run(
                info["experiment"], info["run_name"], info["local_id"], info["start_time"])
            self.journal.write_run(info)
        return self.info["run_id"]

    def deliver(self) -> int:
        """Sends every pending event; returns how many. Raises when the sink cannot take them."""
        run_id = self.ensure_run()
        first = self.journal.lines - len(self.pending)  # the journal line of pending[0]
        sent = 0
        try:
            for sent in self.sink().deliver(run_id, self.pending):
                self.journal.set_delivered(first + sent)
        finally:
            del self.pending[:sent]
        return sent

    @property
    def refused(self) -> tuple[int, str]:
        return (self._sink.refused, self._sink.refusal) if self._sink is not None else (0, "")


# -- the trainer's side ----------------------------------------------------------------------------


class Tracker:
    """Tracks one run from a folder, to the sink serving ``uri`` (call it on rank 0 only).

    Methods never raise because of the store: failures are kept as ``reason`` and the events stay in
    the journal. A folder holds one run: ``start`` in a folder that already has one continues
    it, as does ``start(run_id=...)`` with the run's id in the store; ``attach=True`` adds to a run
    another process owns (an evaluation adding metrics to its training run) without touching
    its status.
    """

    def __init__(self, folder: Path, *, uri: str, experiment: str = "vlframe", timeout_s: float = 5.0,
                 flush_every_s: float = 5.0, enabled: bool = True, catalog: Catalog | None = None):
        """``catalog``: where the sink is found (default: the plugins the environment loads)."""
        self.run_dir = Path(folder)
        self.uri = uri
        self.experiment = experiment
        self.flush_every_s = flush_every_s
        self.enabled = enabled
        self.reason = ""  # why the last delivery failed; empty while the store answers
        self._outbox = _Outbox(self.run_dir / FOLDER, timeout_s, catalog)
        self._active = False  # between start and finish, and only when tracking is enabled
        self._retry_at = 0.0  # time.monotonic() before which no delivery is attempted
        self._last_flush = time.monotonic()
        self._logged: dict[str, int] = {}  # a resumed run's newest journaled step, by metric key

    @classmethod
    def for_config(cls, cfg: TrackingConfig, folder: Path, *, uri: str, catalog: Catalog | None = None) -> Tracker:
        """A tracker with a run config's settings (``tracking:``), delivering to ``uri``."""
        return cls(folder, uri=uri, experiment=cfg.experiment, timeout_s=cfg.timeout_s,
                   flush_every_s=cfg.flush_every_s, enabled=cfg.enabled, catalog=catalog)

    @property
    def run_id(self) -> str | None:
        info = self._outbox.info
        return info["run_id"] if info else None

    @property
    def journal_path(self) -> Path:
        return self._outbox.journal.path

    @property
    def undelivered(self) -> int:
        return len(self._outbox.pending)

    def start(self, *, run_name: str, params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None,
              run_id: str | None = None, attach: bool = False, local_id: str | None = None,
              once_per_step: bool = True, logged_in: Sequence[Path] = ()) -> str | None:
        """Opens the run (a new one, or ``run_id`` reopened); None while the store is unreachable.

        ``local_id``: the run is the one another journal with that id opened (an evaluation of a run
        trained offline: both journals deliver to one run, whichever syncs first creates it).
        A folder whose run was tracked in another store starts over in this one: its whole journal
        is replayed into a new run there.

        ``once_per_step``: a metric at a step this folder's journal (or those of ``logged_in``, the
        folder a run resumed from) already holds is not logged again: a run resumed from a
        checkpoint repeats the steps after it, with the same values. False (a run resumed with
        another config) logs them again, and the store keeps both values at those steps.
        """
        if not self.enabled:
            return None
        sinks.sink_entry(self.uri, self._outbox.catalog)  # no sink serves the URI: said now, not at delivery
        outbox = self._outbox
        info = outbox.info
        if info is not None and info.get("uri") != self.uri:  # another store: nothing there yet
            info, run_id = None, None
            outbox.journal.set_delivered(0)
        resuming = info is not None and run_id in (None, info["run_id"])
        if not resuming:
            info = {"uri": self.uri, "experiment": self.experiment, "experiment_id": None, "run_id": run_id,
                    "run_name": run_name, "local_id": local_id or uuid.uuid4().hex, "start_time": _now_ms()}
            resuming = run_id is not None
        outbox.info = info
        outbox.journal.write_run(info)
        outbox.load()
        self._active = True
        if once_per_step and not attach:
            for journal in (outbox.journal, *(Journal.of(f) for f in logged_in)):
                for event in journal.read(0):
                    if event.get("kind") == "metric":
                        self._logged[event["key"]] = max(self._logged.get(event["key"], -1), int(event["step"]))
            outbox.load()

        now = _now_ms()
        events = [{"kind": "param", "key": k, "value": str(v)} for k, v in (params or {}).items()]
        events += [{"kind": "tag", "key": k, "value": str(v)} for k, v in (tags or {}).items()]
        if resuming and not attach:
            events.append({"kind": "status", "status": "RUNNING", "timestamp": now})
        outbox.record(events)
        self._deliver(force=True)
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self._active:
            return
        now = _now_ms()
        events = [{"kind": "metric", "key": k, "value": float(v), "step": int(step), "timestamp": now}
                  for k, v in metrics.items() if int(step) > self._logged.get(k, -1)]
        if events:
            self._outbox.record(events)
        self._flush_if_due()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or a directory's contents (journaled by path: it must still exist at delivery)."""
        if not self._active:
            return
        self._outbox.record([{"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path,
                              "timestamp": _now_ms()}])
        self.flush()  # artifacts are rare and usually wanted at once

    def set_tags(self, tags: dict[str, str]) -> None:
        if not self._active:
            return
        self._outbox.record([{"kind": "tag", "key": k, "value": str(v)} for k, v in tags.items()])
        self._flush_if_due()

    def flush(self) -> None:
        if self._active:
            self._deliver(force=False)

    def finish(self, status: str | None = "FINISHED") -> TrackingReport:
        """Ends the run (``status`` None: leaves its status as it is, for an attached tracker);
        reports where it is and what is left to sync."""
        if not self._active:
            return TrackingReport()
        if status is not None:
            self._outbox.record([{"kind": "status", "status": status, "timestamp": _now_ms()}])
        self._deliver(force=True)  # one more try even while offline: costs at most one timeout
        self._active = False
        self._outbox.journal.close()
        return self._report()

    def _flush_if_due(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def _deliver(self, *, force: bool) -> None:
        self._last_flush = time.monotonic()
        if not self._outbox.pending and self.run_id is not None:
            return
        if not force and self._last_flush < self._retry_at:
            return
        try:
            self._outbox.deliver()
        except Exception as exc:  # the store down or failing: training goes on, the journal keeps it
            self.reason = short_reason(exc)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
        else:
            self.reason = ""

    def _report(self) -> TrackingReport:
        info = self._outbox.info
        report = TrackingReport(undelivered=self.undelivered)
        if self.run_id is None:
            report.where.append(f"run not created: {info['uri']} could not be reached ({self.reason})")
        else:
            try:
                report.where += self._outbox.sink().describe(self.run_id, info["experiment"], info.get("experiment_id"))
            except Exception as exc:  # noqa: BLE001 - a sink's wording must not end the run badly
                report.where.append(f"run {self.run_id} at {info['uri']} ({short_reason(exc)})")
        refused, why = self._outbox.refused
        if refused:
            report.problems.append(f"{refused} event(s) skipped: {why}")
        if self.undelivered:
            cause = f" ({self.reason})" if self.reason else ""
            report.problems.append(f"{self.undelivered} event(s) not delivered to {info['uri']}{cause}; "
                                   f"they are kept in {self.journal_path}")
            report.problems.append(f"  deliver them with: vlframe tracking sync {shlex.quote(str(self.run_dir))}")
        return report


# -- later delivery --------------------------------------------------------------------------------


def sync(run_dir: Path, uri: str | None = None, catalog: Catalog | None = None) -> tuple[int, str]:
    """Delivers every undelivered journal event of ``run_dir``; returns (events delivered, run id).

    ``uri`` replaces the recorded tracking URI. When the recorded run is not found there (another
    server, or the run was deleted), a new run is created and the whole journal replayed into it.
    """
    outbox = _Outbox(Path(run_dir) / FOLDER, SYNC_TIMEOUT_S, catalog)
    info = outbox.info
    if info is None:
        raise TrackingError(f"{run_dir} has no tracking journal (tracking/run.json is missing)")
    if uri:
        info["uri"] = uri
    outbox.load()
    sink = outbox.sink()  # no sink for the URI: said as it is, not as an unreachable store
    try:
        if info["run_id"] is not None and not sink.run_exists(info["run_id"]):
            info["run_id"] = None
            outbox.journal.set_delivered(0)
            outbox.load()
        run_id = outbox.ensure_run()
        outbox.journal.write_run(info)  # the URI that worked is the one to use next time
        delivered = outbox.deliver()
    except Exception as exc:
        raise TrackingError(
            f"could not deliver to {info['uri']} ({short_reason(exc)}); "
            f"{len(outbox.pending)} event(s) left in {outbox.journal.path}"
        ) from exc
    refused, why = outbox.refused
    if refused:
        # Delivered around them; nothing more can be done, so say it instead of failing.
        logging.getLogger(__name__).warning("%d event(s) skipped: %s", refused, why)
    return delivered, run_id


__all__ = ["Tracker", "TrackingError", "TrackingReport", "flatten", "journal_metrics", "short_reason", "sync",
           "system_metrics"]

"""MLflow tracking that never stalls training and never loses an event.

Every event (param, tag, metric, artifact, status) is first appended to a journal in the run
directory, then delivered to MLflow in journal order. When MLflow cannot be reached, training goes
on, delivery is retried at most every ``RETRY_AFTER_S`` seconds, and ``sync`` (the command
``vlframe tracking sync RUN_DIR``) delivers whatever is left later.

A tracker keeps its journal in ``FOLDER/tracking/``: a training run's folder, an evaluation's
folder (its results go to the training run it evaluated), a sweep's folder (its parent run).
Files there:
  journal.jsonl   one JSON event a line, appended before any delivery attempt
  delivered.json  how many journal lines MLflow already has (rewritten atomically)
  run.json        where the run lives: uri, experiment, run id (null until MLflow has the run)

Delivery is at least once, which is safe because every kind of event is idempotent in MLflow:
a metric identical in key, step, timestamp and value is stored once, params already on the run are
skipped, tags and the status are overwritten, artifacts are re-uploaded to the same place.

mlflow is imported lazily: this module must stay importable (and quick to import) without it,
and importing it changes nothing in the process.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import VlframeError
from vlframe.runs import store, tags

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from vlframe.config.root import TrackingConfig

# MLflow's own limits (mlflow.utils.validation); longer keys or values would be refused.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
# Per-request limits of MLflow's log_batch.
BATCH_LIMITS = {"param": 100, "tag": 100, "metric": 1000}
MAX_BATCH_ENTITIES = 1000
# After a failed delivery, wait this long before trying again: a dead server then costs one
# timeout per RETRY_AFTER_S, not one per training step.
RETRY_AFTER_S = 30.0
# The timeout sync uses when the environment sets none: nothing waits on it, artifacts may be big.
SYNC_TIMEOUT_S = 30.0
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
#: The folder, inside the folder a tracker is given, that holds its journal, and its record of the run.
FOLDER = "tracking"
RUN_FILE = "run.json"
# Tags the MLflow run with our own id, so a run created by an attempt that died before
# recording it in run.json is found again instead of created twice.
LOCAL_ID_TAG = tags.LOCAL_ID


class TrackingError(VlframeError):
    """``sync`` could not deliver a run's journal (no journal, or MLflow unreachable)."""


def flatten(data: Mapping, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"train.lr": "0.0005", ...}``.

    Lists are kept whole, as their JSON text; keys or values MLflow would refuse (too long) are
    dropped rather than failing the whole batch.
    """
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
        if len(name) <= MAX_KEY_LENGTH and len(text) <= MAX_PARAM_VALUE_LENGTH:
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


# -- the tracking folder ---------------------------------------------------------------------------


def _now_ms() -> int:
    return int(time.time() * 1000)


def _write_json_atomic(path: Path, data: Any) -> None:
    # A crash mid-write must leave the previous version, never a truncated file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:  # a full disk leaves no partial file behind
        tmp.unlink(missing_ok=True)


class _Journal:
    """The ``tracking/`` folder of a run directory: journal, delivery count and run.json."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "journal.jsonl"
        self._delivered_path = folder / "delivered.json"
        self._run_path = folder / RUN_FILE
        self._file: Any = None
        self.lines = 0  # lines in the journal, counted by read() then kept up by append()

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
                        events.append(_parse_event(line))
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
        _write_json_atomic(self._delivered_path, {"lines": lines})

    def read_run(self) -> dict | None:
        try:
            return json.loads(self._run_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def write_run(self, info: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self._run_path, info)


def _parse_event(line: str) -> dict:
    try:
        event = json.loads(line)
    except ValueError:
        return {}
    return event if isinstance(event, dict) else {}


# -- talking to MLflow -----------------------------------------------------------------------------


def _create_run(client: MlflowClient, info: dict) -> str:
    exp_id = store.experiment_id(client, info["experiment"])
    info["experiment_id"] = exp_id
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{info['local_id']}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, start_time=info["start_time"], tags={LOCAL_ID_TAG: info["local_id"]},
        run_name=info["run_name"],
    )
    return run.info.run_id


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage != "deleted"


def _is_rejection(exc: Exception) -> bool:
    """MLflow refused the data itself (HTTP 400: bad key, bad value); retrying cannot help.

    Everything else (connection refused, timeouts, server errors) may pass: retry later.
    """
    status = getattr(exc, "get_http_status_code", None)
    return callable(status) and status() == 400


def _short_reason(exc: Exception) -> str:
    text = str(exc).strip()
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("timeout", "timed out"), ("Name or service not known", "unknown host")):
        if needle in text:
            return short
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


class _Delivery:
    """Sends journal events to one MLflow run, in order, in as few requests as MLflow allows."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id
        self.rejected = 0  # events MLflow refused for good, skipped so later ones still go
        self.reason = ""
        self._params: dict[str, str] | None = None  # params already on the run

    def send(self, events: Sequence[dict]) -> Iterator[int]:
        """Delivers ``events``; yields how many are done after each request.

        Raises whatever MLflow raises when it cannot be reached; the caller keeps the rest.
        """
        done = 0
        batch: list[dict] = []
        counts = dict.fromkeys(BATCH_LIMITS, 0)
        for event in events:
            kind = event.get("kind")
            if kind in BATCH_LIMITS:
                if counts[kind] == BATCH_LIMITS[kind] or len(batch) == MAX_BATCH_ENTITIES:
                    self._send_batch(batch)
                    done += len(batch)
                    yield done
                    batch, counts = [], dict.fromkeys(BATCH_LIMITS, 0)
                batch.append(event)
                counts[kind] += 1
                continue
            if batch:
                self._send_batch(batch)
                done += len(batch)
                yield done
                batch, counts = [], dict.fromkeys(BATCH_LIMITS, 0)
            self._send_one(event)
            done += 1
            yield done
        if batch:
            self._send_batch(batch)
            yield done + len(batch)

    def _send_batch(self, events: list[dict]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        param_events = [e for e in events if e["kind"] == "param"]
        params = self._new_params(param_events) if param_events else {}
        tags = {e["key"]: e["value"] for e in events if e["kind"] == "tag"}  # a later value wins
        metrics = [Metric(e["key"], e["value"], e["timestamp"], e["step"]) for e in events if e["kind"] == "metric"]
        if not (params or tags or metrics):
            return
        try:
            self.client.log_batch(
                self.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True,
            )
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            # Find the refused events by halving, so one bad key costs a few requests, not the batch.
            if len(events) == 1:
                self._reject(exc)
                return
            half = len(events) // 2
            self._send_batch(events[:half])
            self._send_batch(events[half:])
            return
        if params:
            self._params.update(params)

    def _new_params(self, events: list[dict]) -> dict[str, str]:
        """Params not on the run yet: a resumed run keeps the values it was started with."""
        if self._params is None:
            self._params = dict(self.client.get_run(self.run_id).data.params)
        new: dict[str, str] = {}
        for event in events:
            if event["key"] not in self._params:
                new.setdefault(event["key"], event["value"])
        return new

    def _send_one(self, event: dict) -> None:
        kind = event.get("kind")
        try:
            if kind == "artifact":
                path = Path(event["path"])
                if not path.exists():
                    self.rejected += 1
                    self.reason = f"artifact {path} no longer exists"
                elif path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), event.get("artifact_path"))
                else:
                    self.client.log_artifact(self.run_id, str(path), event.get("artifact_path"))
            elif kind == "status" and event["status"] in TERMINAL_STATUSES:
                self.client.set_terminated(self.run_id, event["status"], end_time=event["timestamp"])
            elif kind == "status":
                self.client.update_run(self.run_id, status=event["status"])
            # Anything else (an unreadable line) has nothing to deliver.
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            self._reject(exc)

    def _reject(self, exc: Exception) -> None:
        self.rejected += 1
        self.reason = f"MLflow refused an event: {_short_reason(exc)}"


class _Outbox:
    """A run's undelivered journal events and the MLflow run they go to."""

    def __init__(self, folder: Path, timeout_s: float):
        self.journal = _Journal(folder)
        self.timeout_s = timeout_s
        self.info: dict | None = self.journal.read_run()
        self.pending: list[dict] = []
        self._client: MlflowClient | None = None
        self._delivery: _Delivery | None = None

    def load(self) -> None:
        """Picks up the events an earlier process journaled but did not deliver."""
        self.pending = self.journal.read(self.journal.delivered())

    def record(self, events: Sequence[dict]) -> None:
        self.journal.append(events)
        self.pending.extend(events)

    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = store.client(self.info["uri"])
        return self._client

    def ensure_run(self) -> str:
        if self.info["run_id"] is None:
            with store.bounded(self.timeout_s):
                self.info["run_id"] = _create_run(self.client(), self.info)
            self.journal.write_run(self.info)
        return self.info["run_id"]

    def deliver(self) -> int:
        """Sends every pending event; returns how many. Raises when MLflow cannot take them."""
        run_id = self.ensure_run()
        if self._delivery is None or self._delivery.run_id != run_id:
            self._delivery = _Delivery(self.client(), run_id)
        first = self.journal.lines - len(self.pending)  # the journal line of pending[0]
        sent = 0
        try:
            with store.bounded(self.timeout_s):
                for sent in self._delivery.send(self.pending):
                    self.journal.set_delivered(first + sent)
        finally:
            del self.pending[:sent]
        return sent

    @property
    def rejected(self) -> tuple[int, str]:
        return (self._delivery.rejected, self._delivery.reason) if self._delivery else (0, "")


# -- the trainer's side ----------------------------------------------------------------------------


class Tracker:
    """Tracks one MLflow run from a folder (call it on rank 0 only).

    Methods never raise because of MLflow: failures are kept as ``reason`` and the events stay in
    the journal. A folder holds one run: ``start`` in a folder that already has one continues
    it, as does ``start(run_id=...)`` with the run's MLflow id; ``attach=True`` adds to a run
    another process owns (an evaluation adding metrics to its training run) without touching
    its status.
    """

    def __init__(self, folder: Path, *, uri: str, experiment: str = "vlframe", timeout_s: float = 5.0,
                 flush_every_s: float = 5.0, enabled: bool = True):
        self.run_dir = Path(folder)
        self.uri = uri
        self.experiment = experiment
        self.flush_every_s = flush_every_s
        self.enabled = enabled
        self.reason = ""  # why the last delivery failed; empty while MLflow answers
        self._outbox = _Outbox(self.run_dir / FOLDER, timeout_s)
        self._active = False  # between start and finish, and only when tracking is enabled
        self._retry_at = 0.0  # time.monotonic() before which no delivery is attempted
        self._last_flush = time.monotonic()
        self._logged: dict[str, int] = {}  # a resumed run's newest journaled step, by metric key

    @classmethod
    def for_config(cls, cfg: TrackingConfig, folder: Path, *, uri: str) -> Tracker:
        """A tracker with a run config's settings (``tracking:``), delivering to ``uri``."""
        return cls(folder, uri=uri, experiment=cfg.experiment, timeout_s=cfg.timeout_s,
                   flush_every_s=cfg.flush_every_s, enabled=cfg.enabled)

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
        """Opens the MLflow run (a new one, or ``run_id`` reopened); None while MLflow is unreachable.

        ``local_id``: the run is the one another journal with that id opened (an evaluation of a run
        trained offline: both journals deliver to one MLflow run, whichever syncs first creates it).
        A folder whose run was tracked in another store starts over in this one: its whole journal
        is replayed into a new run there.

        ``once_per_step``: a metric at a step this folder's journal (or those of ``logged_in``, the
        folder a run resumed from) already holds is not logged again: a run resumed from a
        checkpoint repeats the steps after it, with the same values. False (a run resumed with
        another config) logs them again, and MLflow keeps both values at those steps.
        """
        if not self.enabled:
            return None
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
            for journal in (outbox.journal, *(_Journal(Path(f) / FOLDER) for f in logged_in)):
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

    def finish(self, status: str | None = "FINISHED") -> list[str]:
        """Ends the run (``status`` None: leaves its status as it is, for an attached tracker);
        returns lines telling the user where it is and what is left to sync."""
        if not self._active:
            return []
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
        except Exception as exc:  # MLflow down or failing: training goes on, the journal keeps it
            self.reason = _short_reason(exc)
            self._retry_at = time.monotonic() + RETRY_AFTER_S
        else:
            self.reason = ""

    def _report(self) -> list[str]:
        info = self._outbox.info
        uri = info["uri"]
        if self.run_id is None:
            lines = [f"MLflow run not created: {uri} could not be reached ({self.reason})"]
        else:
            lines = [f"MLflow run {self.run_id} in experiment '{info['experiment']}' at {uri}"]
            if store.is_local(uri):
                # `python -m mlflow`: the mlflow script need not be on PATH (it is not in .venv/bin).
                ui = f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(uri)}"
                lines.append(f"  view it with: {ui}")
            elif info.get("experiment_id") is not None:
                page = f"#/experiments/{info['experiment_id']}/runs/{self.run_id}"
                lines.append(f"  view it at: {uri.rstrip('/')}/{page}")
        rejected, why = self._outbox.rejected
        if rejected:
            lines.append(f"{rejected} event(s) skipped: {why}")
        if self.undelivered:
            cause = f" ({self.reason})" if self.reason else ""
            lines.append(f"{self.undelivered} event(s) not delivered to MLflow{cause}; "
                         f"they are kept in {self.journal_path}")
            lines.append(f"  deliver them with: vlframe tracking sync {shlex.quote(str(self.run_dir))}")
        return lines


# -- later delivery --------------------------------------------------------------------------------


def sync(run_dir: Path, uri: str | None = None) -> tuple[int, str]:
    """Delivers every undelivered journal event of ``run_dir``; returns (events delivered, run id).

    ``uri`` replaces the recorded tracking URI. When the recorded run is not found there (another
    server, or the run was deleted), a new run is created and the whole journal replayed into it.
    """
    outbox = _Outbox(Path(run_dir) / FOLDER, SYNC_TIMEOUT_S)
    info = outbox.info
    if info is None:
        raise TrackingError(f"{run_dir} has no tracking journal (tracking/run.json is missing)")
    if uri:
        info["uri"] = uri
    outbox.load()
    try:
        with store.bounded(SYNC_TIMEOUT_S):
            exists = info["run_id"] is None or _run_exists(outbox.client(), info["run_id"])
        if not exists:
            info["run_id"] = None
            outbox.journal.set_delivered(0)
            outbox.load()
        run_id = outbox.ensure_run()
        outbox.journal.write_run(info)  # the URI that worked is the one to use next time
        delivered = outbox.deliver()
    except Exception as exc:
        raise TrackingError(
            f"could not deliver to MLflow at {info['uri']} ({_short_reason(exc)}); "
            f"{len(outbox.pending)} event(s) left in {outbox.journal.path}"
        ) from exc
    rejected, why = outbox.rejected
    if rejected:
        # Delivered around them; nothing more can be done, so say it instead of failing.
        logging.getLogger(__name__).warning("%d event(s) skipped: %s", rejected, why)
    return delivered, run_id


def journal_metrics(folder: Path, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every ``key`` metric a tracker journaled in ``folder/tracking``: read
    from the file, so it works whether or not MLflow ever got them."""
    journal = _Journal(Path(folder) / FOLDER)
    return [(int(e["step"]), float(e["value"])) for e in journal.read(0)
            if e.get("kind") == "metric" and e.get("key") == key]

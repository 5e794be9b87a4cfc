"""The MLflow tracking sink: runs, their metrics and artifacts in an MLflow store, and read back.

It serves file paths and ``file:``, ``sqlite:``, ``http(s):``, ``databricks`` and database URIs,
and is the default: a run whose config names no URI goes to ``$MLFLOW_TRACKING_URI``, else to
the embedded store ``sqlite:///<train.output_dir>/mlflow.db`` (:mod:`.mlflow_store` makes it
safely). Delivery sends the journal's events in as few requests as MLflow allows (``log_batch``);
an event MLflow refuses for good (HTTP 400) is found by halving the batch and skipped, so one bad
key costs a few requests, not the run's history. Every request is bounded by the timeout vlframe
gives, so a dead server never stalls training.

mlflow is imported when the sink first talks to a store, not when the plugin loads.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from registry import ComponentSpec, RunRecord, TrackingSinkConfig, hookimpl, one_line
from vlframe_builtins.tracking import mlflow_store as store

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow's own limits (mlflow.utils.validation): a longer param is left out (the resolved config,
# an artifact, holds it) rather than failing the batch it is in.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
# Per-request limits of MLflow's log_batch.
BATCH_LIMITS = {"param": 100, "tag": 100, "metric": 1000}
MAX_BATCH_ENTITIES = 1000
# Tags the MLflow run with the journal's own id, so a run created by an attempt that died before
# recording it is found again instead of created twice.
LOCAL_ID_TAG = "vlframe.local_id"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


class MLflowSinkConfig(TrackingSinkConfig):
    """The MLflow sink (no settings: the URI says where, ``tracking.timeout_s`` how long to wait)."""

    schemes: ClassVar[frozenset[str]] = frozenset(
        {"", "file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql"})
    default: ClassVar[bool] = True
    run_id: ClassVar[str] = r"[0-9a-f]{32}"

    @classmethod
    def default_uri(cls, output_dir: Path) -> str:
        return store.default_uri(output_dir)

    @classmethod
    def example_uri(cls, folder: Path) -> str:
        return store.embedded_uri(folder)


def _is_rejection(exc: Exception) -> bool:
    """MLflow refused the data itself (HTTP 400: bad key, bad value); retrying cannot help.

    Everything else (connection refused, timeouts, server errors) may pass: retry later.
    """
    status = getattr(exc, "get_http_status_code", None)
    return callable(status) and status() == 400


class MLflowSink:
    """One MLflow store (``uri``), every request bounded by ``timeout_s``."""

    def __init__(self, config: MLflowSinkConfig, *, uri: str, timeout_s: float) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.refused = 0  # events MLflow refused for good, skipped so that later ones still go
        self.refusal = ""
        self._client: MlflowClient | None = None
        self._params: dict[str, dict[str, str]] = {}  # params already on each run
        self._experiments: dict[str, str] = {}  # experiment names by id

    def _absent(self) -> bool:
        """An embedded store that does not exist yet: nothing to read, and nothing to create for it."""
        db = store.sqlite_path(self.uri)
        return db is not None and not db.is_file()

    def client(self) -> MlflowClient:
        if self._client is None:
            with store.bounded(self.timeout_s):
                self._client = store.client(self.uri)
        return self._client

    # -- writing -----------------------------------------------------------------------------

    def create_run(self, experiment: str, name: str, local_id: str, start_time: int) -> tuple[str, str | None]:
        with store.bounded(self.timeout_s):
            mlflow = self.client()
            exp_id = store.experiment_id(mlflow, experiment)
            found = mlflow.search_runs([exp_id], filter_string=f"tags.`{LOCAL_ID_TAG}` = '{local_id}'", max_results=1)
            if found:
                return found[0].info.run_id, exp_id
            run = mlflow.create_run(exp_id, start_time=start_time, tags={LOCAL_ID_TAG: local_id}, run_name=name)
            return run.info.run_id, exp_id

    def run_exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        if self._absent():
            return False
        try:
            with store.bounded(self.timeout_s):
                run = self.client().get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def deliver(self, run_id: str, events: Sequence[Mapping[str, Any]]) -> Iterator[int]:
        done = 0
        batch: list[Mapping[str, Any]] = []
        counts = dict.fromkeys(BATCH_LIMITS, 0)
        with store.bounded(self.timeout_s):
            for event in events:
                kind = event.get("kind")
                if kind in BATCH_LIMITS:
                    if counts[kind] == BATCH_LIMITS[kind] or len(batch) == MAX_BATCH_ENTITIES:
                        self._send_batch(run_id, batch)
                        done += len(batch)
                        yield done
                        batch, counts = [], dict.fromkeys(BATCH_LIMITS, 0)
                    batch.append(event)
                    counts[kind] += 1
                    continue
                if batch:
                    self._send_batch(run_id, batch)
                    done += len(batch)
                    yield done
                    batch, counts = [], dict.fromkeys(BATCH_LIMITS, 0)
                self._send_one(run_id, event)
                done += 1
                yield done
            if batch:
                self._send_batch(run_id, batch)
                yield done + len(batch)

    def _send_batch(self, run_id: str, events: list[Mapping[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        param_events = [e for e in events if e["kind"] == "param" and len(e["key"]) <= MAX_KEY_LENGTH
                        and len(str(e["value"])) <= MAX_PARAM_VALUE_LENGTH]
        params = self._new_params(run_id, param_events) if param_events else {}
        tags = {e["key"]: e["value"] for e in events if e["kind"] == "tag"}  # a later value wins
        metrics = [Metric(e["key"], e["value"], e["timestamp"], e["step"]) for e in events if e["kind"] == "metric"]
        if not (params or tags or metrics):
            return
        try:
            self.client().log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                                    tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            # Find the refused events by halving, so one bad key costs a few requests, not the batch.
            if len(events) == 1:
                self._refuse(exc)
                return
            half = len(events) // 2
            self._send_batch(run_id, events[:half])
            self._send_batch(run_id, events[half:])
            return
        if params:
            self._params[run_id].update(params)

    def _new_params(self, run_id: str, events: list[Mapping[str, Any]]) -> dict[str, str]:
        """Params not on the run yet: a resumed run keeps the values it was started with."""
        if run_id not in self._params:
            self._params[run_id] = dict(self.client().get_run(run_id).data.params)
        known, new = self._params[run_id], {}
        for event in events:
            if event["key"] not in known:
                new.setdefault(event["key"], event["value"])
        return new

    def _send_one(self, run_id: str, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        mlflow = self.client()
        try:
            if kind == "artifact":
                path = Path(event["path"])
                if not path.exists():
                    self.refused += 1
                    self.refusal = f"artifact {path} no longer exists"
                elif path.is_dir():
                    mlflow.log_artifacts(run_id, str(path), event.get("artifact_path"))
                else:
                    mlflow.log_artifact(run_id, str(path), event.get("artifact_path"))
            elif kind == "status" and event["status"] in TERMINAL_STATUSES:
                mlflow.set_terminated(run_id, event["status"], end_time=event["timestamp"])
            elif kind == "status":
                mlflow.update_run(run_id, status=event["status"])
            # Anything else (an unreadable line) has nothing to deliver.
        except Exception as exc:
            if not _is_rejection(exc):
                raise
            self._refuse(exc)

    def _refuse(self, exc: Exception) -> None:
        self.refused += 1
        self.refusal = f"MLflow refused an event: {one_line(exc, 200, hint=False)}"

    def describe(self, run_id: str, experiment: str, experiment_id: str | None) -> list[str]:
        lines = [f"MLflow run {run_id} in experiment '{experiment}' at {self.uri}"]
        if store.is_local(self.uri):
            # `python -m mlflow`: the mlflow script need not be on PATH (it is not in .venv/bin).
            ui = f"{shlex.quote(sys.executable)} -m mlflow ui --backend-store-uri {shlex.quote(self.uri)}"
            lines.append(f"  view it with: {ui}")
        elif experiment_id is not None:
            lines.append(f"  view it at: {self.uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
        return lines

    # -- reading back --------------------------------------------------------------------------

    def _record(self, run: Any) -> RunRecord:
        info, data = run.info, run.data
        if info.experiment_id not in self._experiments:
            self._experiments[info.experiment_id] = self.client().get_experiment(info.experiment_id).name
        return RunRecord(run_id=info.run_id, name=info.run_name or "", status=info.status or "",
                         start_time=int(info.start_time or 0), experiment_id=info.experiment_id,
                         tags=dict(data.tags), metrics=dict(data.metrics), params=dict(data.params),
                         experiment=self._experiments[info.experiment_id])

    def find_runs(self, experiment: str | None, tags: Mapping[str, str]) -> list[RunRecord]:
        if self._absent():
            return []
        with store.bounded(self.timeout_s):
            mlflow = self.client()
            if experiment is None:
                ids, token = [], None
                while True:  # every page of experiments
                    page = mlflow.search_experiments(page_token=token)
                    ids += [e.experiment_id for e in page]
                    token = page.token
                    if not token:
                        break
            else:
                found = mlflow.get_experiment_by_name(experiment)
                ids = [found.experiment_id] if found is not None else []
            if not ids:
                return []
            # Values with quotes cannot go into MLflow's filter string: those are matched here.
            exact = {k: v for k, v in tags.items() if "'" not in v and "`" not in k}
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in exact.items())
            runs = mlflow.search_runs(ids, filter_string=query, order_by=["attributes.start_time DESC"],
                                      max_results=5000)
            return [self._record(r) for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]

    def get_run(self, run_id: str) -> RunRecord:
        from mlflow.exceptions import MlflowException

        if self._absent():
            raise LookupError(f"MLflow run {run_id} not found: there is no store at {self.uri}")
        try:
            with store.bounded(self.timeout_s):
                return self._record(self.client().get_run(run_id))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise LookupError(f"MLflow run {run_id} not found at {self.uri}") from None
            raise

    def download(self, run_id: str, artifact_path: str, dest: Path) -> Path:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per small file otherwise
        with store.bounded(max(self.timeout_s, 300.0)):  # checkpoints are large
            return Path(self.client().download_artifacts(run_id, artifact_path, str(dest)))


@hookimpl
def vlframe_tracking_sinks() -> list[ComponentSpec]:
    return [ComponentSpec("mlflow", MLflowSinkConfig, MLflowSink,
                          "MLflow: a local store (the default, sqlite under the output folder) or a tracking server.")]

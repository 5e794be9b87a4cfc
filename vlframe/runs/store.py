"""Which MLflow store a command uses, and talking to it. One rule for every command:

1. the store named on the command line (``--tracking-uri``);
2. the run's config (``tracking.uri``), or the store a run folder recorded;
3. ``$MLFLOW_TRACKING_URI``;
4. the embedded store ``sqlite:///<output folder>/mlflow.db`` (``train.output_dir``, default ``runs``).

MLflow retries a dead server for minutes by default. vlframe bounds every request it makes
(:func:`bounded`), for the duration of its own calls only: nothing in the process environment
changes for good.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
DEFAULT_OUTPUT = Path("runs")
_LIMITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def embedded_uri(output_dir: Path | None = None) -> str:
    return f"sqlite:///{(output_dir or DEFAULT_OUTPUT).resolve() / 'mlflow.db'}"


def store_uri(given: str | None = None, configured: str | None = None, output_dir: Path | None = None) -> str:
    """The tracking URI by the rule above."""
    return given or configured or os.environ.get(ENV_URI) or embedded_uri(output_dir)


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri.removeprefix("sqlite:///"))
    return None


def is_local(uri: str) -> bool:
    return sqlite_path(uri) is not None or uri.startswith("file:") or "://" not in uri


@contextlib.contextmanager
def bounded(timeout_s: float) -> Iterator[None]:
    """MLflow requests inside fail after one try of ``timeout_s`` (unless the user set limits)."""
    saved = {name: os.environ.get(name) for name in _LIMITS}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def client(uri: str) -> MlflowClient:
    """An MLflow client of ``uri``; an embedded store's folder is created (sqlite creates only the file)."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def experiment_id(mlflow: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing (artifacts beside an embedded store)."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # An embedded sqlite store would put artifacts under the current directory: keep them next
    # to the database instead. A server chooses its own location.
    db = sqlite_path(mlflow.tracking_uri)
    location = (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:
        # Another process may have created it in between.
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id

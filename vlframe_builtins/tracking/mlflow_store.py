"""Talking to an MLflow store: bounded requests, and an embedded store made safely.

Where a run is tracked when its config names no store: ``$MLFLOW_TRACKING_URI``, else the embedded
store ``sqlite:///<output folder>/mlflow.db`` (``train.output_dir``, default ``runs``).

MLflow retries a dead server for minutes by default. vlframe bounds every request it makes
(:func:`bounded`), for the duration of its own calls only: nothing in the process environment
changes for good.

An embedded store is created and its schema migrated by whichever process touches it first;
MLflow does that without a lock, so two runs starting at once could leave it half-migrated for
good. vlframe serialises the first touch of each store across processes (``mlflow.db.lock``),
and a store found half-migrated is replaced when it holds no runs (the old file is kept beside
it), or reported with the command that upgrades it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from registry import VlframeError, in_one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
_LIMITS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def embedded_uri(output_dir: Path) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def default_uri(output_dir: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded store of ``output_dir``."""
    return os.environ.get(ENV_URI) or embedded_uri(output_dir)


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


class StoreError(VlframeError):
    """An embedded MLflow store that cannot be used as it is (and was not safe to replace)."""


def client(uri: str) -> MlflowClient:
    """An MLflow client of ``uri``; an embedded store is made ready first (see the module's text)."""
    from mlflow import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        prepare_sqlite(db)
    return MlflowClient(tracking_uri=uri)


_PREPARED: set[Path] = set()


#: What an interrupted (or raced) schema migration leaves, as SQLite words it.
_HALF_MIGRATED = ("already exists", "duplicate column name", "no such table", "no such column")


def prepare_sqlite(db: Path) -> None:
    """Create or migrate the embedded store ``db`` holding a lock no other process can hold meanwhile;
    repair (or report) a store an earlier race or crash left half-migrated. Once per process.

    Only a store that is half-migrated (tables an interrupted migration leaves, or the errors
    one causes) and holds nothing (no run, no experiment but the default one) is ever moved
    aside; any other failure (a locked or read-only store, a newer schema) is a
    :class:`StoreError` that says what it is and leaves the store as it was."""
    db = db.resolve()
    if db in _PREPARED:
        return
    uri = f"sqlite:///{db}"
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(db.with_name(f"{db.name}.lock")):
            _prepare_locked(db, uri)
    except OSError as exc:
        raise StoreError(f"the MLflow store {db} cannot be opened ({exc.strerror or exc})") from None
    _PREPARED.add(db)


def _prepare_locked(db: Path, uri: str) -> None:
    leftover = _leftover_tables(db)
    problem = f"table {leftover[0]} left by an interrupted schema migration" if leftover else None
    if problem is None:
        try:
            _touch(uri)
            return
        except Exception as exc:  # noqa: BLE001 - sorted out below by what it says
            text = " ".join(str(exc).split())
            if not any(words in text for words in _HALF_MIGRATED):
                raise StoreError(f"the MLflow store {db} cannot be used: {text[:300]}") from None
            problem = text[:300]
    if _holds_data(db):
        raise StoreError(f"the MLflow store {db} is half-migrated ({problem}) and holds runs or experiments, so "
                         f"vlframe leaves it as it is: back it up, then run `{sys.executable} -m mlflow db upgrade "
                         f"{uri}`, or move it away to start a new store")
    aside = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(db, aside)
    try:
        _touch(uri)
    except Exception as exc:  # noqa: BLE001 - even a new store fails: a full disk, a read-only folder
        raise StoreError(f"the MLflow store {db} was half-migrated and a new one could not be made there "
                         f"({in_one_line(exc, 200)}); the old file is {aside.name}") from None
    logging.getLogger("vlframe").warning(
        "the MLflow store %s was half-migrated (%s) and held nothing: a new one replaces it (the old file is %s)",
        db, problem, aside.name)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another process creates or migrates the store
        except OSError as exc:  # a file system without locks (some NFS, Lustre mounts): go on unguarded
            logging.getLogger("vlframe").warning("cannot lock %s (%s): creating the store unguarded", lock_file,
                                                 exc.strerror)
        yield
    finally:
        os.close(fd)


def _touch(uri: str) -> None:
    """Open the store (creating and migrating its schema when needed)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def _tables(db: Path) -> list[str]:
    if not db.is_file() or db.stat().st_size == 0:
        return []
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return [row[0] for row in con.execute("select name from sqlite_master where type = 'table'")]


def _leftover_tables(db: Path) -> list[str]:
    try:
        return sorted(t for t in _tables(db) if t.startswith("_alembic_tmp_"))
    except sqlite3.Error:
        return []


def _holds_data(db: Path) -> bool:
    """Whether the store holds a run, or an experiment besides the default one (or cannot tell)."""
    try:
        tables = _tables(db)
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            for table in tables:
                name = table.removeprefix("_alembic_tmp_")
                if name in ("runs", "registered_models") and con.execute(f"select count(*) from {table}").fetchone()[0]:
                    return True  # noqa: S608 - table names from the database itself
                if name == "experiments" and con.execute(
                        f"select count(*) from {table} where experiment_id != 0").fetchone()[0]:
                    return True
    except sqlite3.Error:
        return True  # cannot tell: leave it alone
    return False


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

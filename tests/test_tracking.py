"""MLflow tracking against real stores: an embedded sqlite file and `mlflow server` subprocesses."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import new_store
from mlflow_server import _free_port
from vlframe.runs import tracking
from vlframe.config.root import TrackingConfig
from vlframe.runs.tracking import Tracker, TrackingError, flatten, sync, system_metrics

@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # Each test starts without these (setenv first so that monkeypatch restores the caller's state);
    # the tracker sets them only around its own requests (test_no_process_wide_environment_change).
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def _config(**kwargs) -> TrackingConfig:
    return TrackingConfig(experiment="vlframe-test", **{"timeout_s": 3.0, **kwargs})


def _tracker(run_dir: Path, default_uri: str, **kwargs) -> Tracker:
    cfg = _config(**kwargs)
    return Tracker.for_config(cfg, run_dir, uri=cfg.uri or default_uri)


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _delivered_lines(run_dir: Path) -> int:
    return json.loads((run_dir / "tracking" / "delivered.json").read_text())["lines"]


def _delivered_lines_or_0(run_dir: Path) -> int:
    return _delivered_lines(run_dir) if (run_dir / "tracking" / "delivered.json").exists() else 0


def test_local_store_round_trip(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "run"
    (run_dir / "ckpt" / "extra").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("model: {}\n")
    (run_dir / "ckpt" / "weights.bin").write_bytes(b"\x00\x01weights")
    (run_dir / "ckpt" / "extra" / "notes.txt").write_text("nested")

    tracker = _tracker(run_dir, uri, flush_every_s=60)
    params = flatten({"model": {"width": 256, "layers": [1, 2]}, "lr": 0.001})
    run_id = tracker.start(run_name="local", params=params, tags={"team": "vision"})
    assert run_id is not None and tracker.run_id == run_id
    for step in range(5):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step=step)
    assert tracker.undelivered == 10  # buffered until flush_every_s
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_artifact(run_dir / "ckpt", "checkpoint")
    tracker.set_tags({"vlframe.skipped_samples": "0"})
    lines = tracker.finish()

    assert tracker.undelivered == 0
    assert any(run_id in line for line in lines)
    assert any(f"mlflow ui --backend-store-uri {uri}" in line for line in lines)
    assert not any("vlframe tracking sync" in line for line in lines)
    journal = tracker.journal_path.read_text().splitlines()
    assert _delivered_lines(run_dir) == len(journal)
    assert {json.loads(line)["kind"] for line in journal} == {"param", "tag", "metric", "artifact", "status"}
    assert json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"] == run_id

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "local"
    assert run.data.params == {"model.width": "256", "model.layers": "[1, 2]", "lr": "0.001"}
    assert run.data.tags["team"] == "vision" and run.data.tags["vlframe.skipped_samples"] == "0"
    assert _history(client, run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "checkpoint"}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoint")} == {"checkpoint/weights.bin",
                                                                             "checkpoint/extra"}
    local = Path(client.download_artifacts(run_id, "checkpoint/weights.bin", str(tmp_path / "dl")))
    assert local.read_bytes() == b"\x00\x01weights"
    # Artifacts of the embedded store sit next to its database, not in the current directory.
    assert (tmp_path / "mlartifacts").is_dir()

    # A crash mid-write left half a line; resuming reopens the run, keeps the params it was
    # started with, and journals after the broken line instead of into it.
    with tracker.journal_path.open("a") as journal_file:
        journal_file.write('{"kind": "met')
    resumed = _tracker(run_dir, uri)
    assert resumed.start(run_name="local", params={"lr": "0.5", "new": "1"}, tags={}, run_id=run_id) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_metrics({"train/loss": 0.1}, step=5)
    resumed.finish("KILLED")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.params["lr"] == "0.001" and run.data.params["new"] == "1"
    assert _history(client, run_id, "train/loss")[-1] == (5, 0.1)
    journal = resumed.journal_path.read_text().splitlines()
    assert resumed.undelivered == 0 and _delivered_lines(run_dir) == len(journal)
    assert journal[-6] == '{"kind": "met'  # then 2 params, RUNNING, the metric, KILLED
    assert [json.loads(line)["kind"] for line in journal[-5:]] == ["param", "param", "status", "metric", "status"]


def test_disabled_tracker_does_nothing(tmp_path: Path) -> None:
    tracker = _tracker(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", enabled=False)
    assert tracker.start(run_name="off", params={"a": "1"}, tags={}) is None
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path)
    tracker.set_tags({"a": "b"})
    tracker.flush()
    assert tracker.finish().lines == [] and tracker.undelivered == 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_server_round_trip(tmp_path: Path, servers) -> None:
    server = servers()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("a: 1\n")
    tracker = _tracker(run_dir, "sqlite:///unused.db", uri=server.uri, flush_every_s=0.01)
    run_id = tracker.start(run_name="remote", params={"a": "1", "b": "x"}, tags={"t": "v"})
    assert run_id is not None
    for step in range(3):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.log_artifact(run_dir / "config.yaml", "cfg")
    lines = tracker.finish()
    assert tracker.undelivered == 0
    assert any(f"{server.uri}/#/experiments/" in line and run_id in line for line in lines)

    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"a": "1", "b": "x"} and run.data.tags["t"] == "v"
    assert _history(client, run_id, "loss") == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert [a.path for a in client.list_artifacts(run_id, "cfg")] == ["cfg/config.yaml"]
    local = Path(client.download_artifacts(run_id, "cfg/config.yaml", str(tmp_path / "dl")))
    assert local.read_text() == "a: 1\n"
    assert list((tmp_path / "artifacts").rglob("config.yaml"))  # uploaded through the server

    # A run with nothing to log yet is still created at start.
    bare = _tracker(tmp_path / "bare", "sqlite:///unused.db", uri=server.uri)
    bare_id = bare.start(run_name="bare", params={}, tags={})
    assert bare_id is not None and client.get_run(bare_id).info.status == "RUNNING"
    bare.finish("FAILED")
    assert client.get_run(bare_id).info.status == "FAILED"


@pytest.mark.slow
def test_server_dies_mid_run_then_sync(tmp_path: Path, servers) -> None:
    server = servers()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = _tracker(run_dir, "sqlite:///unused.db", uri=server.uri, flush_every_s=0.01)
    run_id = tracker.start(run_name="crash", params={"a": "1"}, tags={})
    assert run_id is not None
    for step in range(10):
        tracker.log_metrics({"loss": step * 0.5}, step=step)
    tracker.flush()
    assert tracker.undelivered == 0

    server.kill()
    (run_dir / "late.txt").write_text("written while offline")
    began = time.monotonic()
    for step in range(10, 30):
        tracker.log_metrics({"loss": step * 0.5}, step=step)
        time.sleep(0.02)  # let flush_every_s pass: every step wants a flush
    tracker.log_artifact(run_dir / "late.txt")
    lines = tracker.finish()
    assert time.monotonic() - began < 15
    text = "\n".join(lines)
    assert "vlframe tracking sync" in text and str(tracker.journal_path) in text
    pending = tracker.undelivered
    assert pending == 22  # 20 metrics, the artifact, the final status

    server.start()  # same port, same database
    assert sync(run_dir) == (pending, run_id)
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert _history(client, run_id, "loss") == [(s, s * 0.5) for s in range(30)]
    assert [a.path for a in client.list_artifacts(run_id)] == ["late.txt"]
    assert sync(run_dir) == (0, run_id)


@pytest.mark.slow
def test_unreachable_from_start(tmp_path: Path, servers, monkeypatch: pytest.MonkeyPatch) -> None:
    port = _free_port()  # nothing listens there yet
    uri = f"http://127.0.0.1:{port}"
    offline, recovering = tmp_path / "offline", tmp_path / "recovering"

    began = time.monotonic()
    tracker = _tracker(offline, "sqlite:///unused.db", uri=uri, flush_every_s=0.01)
    assert tracker.start(run_name="never-online", params={"a": "1", "b": "2"}, tags={"t": "v"}) is None
    for step in range(10):
        tracker.log_metrics({"loss": float(step), "acc": step / 10}, step=step)
    lines = tracker.finish()
    assert time.monotonic() - began < 5
    assert "not created" in lines.where[0] and any("vlframe tracking sync" in line for line in lines)
    assert tracker.undelivered == 2 + 1 + 20 + 1  # params, tag, metrics, status

    with pytest.raises(TrackingError, match="connection refused"):
        sync(offline)
    assert tracker.undelivered == 24 and _delivered_lines_or_0(offline) == 0
    with pytest.raises(TrackingError, match="no tracking journal"):
        sync(tmp_path / "elsewhere")

    # A second run stays open and should reach MLflow by itself once the server is up.
    monkeypatch.setattr(tracking, "RETRY_AFTER_S", 0.2)
    live = _tracker(recovering, "sqlite:///unused.db", uri=uri, flush_every_s=0.01)
    assert live.start(run_name="recovers", params={"c": "3"}, tags={}) is None
    live.log_metrics({"loss": 1.0}, step=0)

    server = servers(port)
    delivered, run_id = sync(offline)
    assert delivered == 24
    client = MlflowClient(tracking_uri=server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "never-online"
    assert run.data.params == {"a": "1", "b": "2"} and run.data.tags["t"] == "v"
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(10)]
    assert _history(client, run_id, "acc") == [(s, s / 10) for s in range(10)]
    assert json.loads((offline / "tracking" / "run.json").read_text())["run_id"] == run_id
    assert sync(offline) == (0, run_id)

    time.sleep(0.3)
    live.log_metrics({"loss": 0.5}, step=1)
    assert live.run_id is not None and live.undelivered == 0
    live.finish()
    assert _history(client, live.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert client.get_run(live.run_id).data.params == {"c": "3"}


def test_flatten() -> None:
    data = {
        "model": {"image_encoder": {"width": 256, "act": None}, "empty": {}},
        "layers": [1, {"x": 2}],
        "long": "x" * 6001,
        "ok": "y" * 6000,
        "k" * 251: 1,
        "flag": True,
    }
    assert flatten(data) == {
        "model.image_encoder.width": "256",
        "model.image_encoder.act": "None",
        "model.empty": "{}",
        "layers": '[1, {"x": 2}]',
        "long": "x" * 6001,
        "ok": "y" * 6000,
        "k" * 251: "1",
        "flag": "True",
    }
    assert flatten({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


def test_params_mlflow_cannot_hold_are_left_out_and_the_rest_delivered(tmp_path: Path) -> None:
    """MLflow holds params of up to 250-character keys and 6000-character values: its sink leaves
    longer ones out (the resolved config, an artifact, has them) instead of failing the batch."""
    uri = new_store(tmp_path / "mlflow.db")
    tracker = _tracker(tmp_path / "run", uri)
    run_id = tracker.start(run_name="long", params={"long": "x" * 6001, "ok": "y" * 6000, "k" * 251: "1", "a": "2"})
    assert tracker.finish().problems == []
    assert MlflowClient(tracking_uri=uri).get_run(run_id).data.params == {"ok": "y" * 6000, "a": "2"}


def test_system_metrics() -> None:
    metrics = system_metrics()
    assert set(metrics) == {"system/cpu_percent", "system/memory_rss_gb", "system/memory_used_percent"}
    assert all(isinstance(v, float) for v in metrics.values()) and metrics["system/memory_rss_gb"] > 0


def test_a_folder_tracked_in_one_store_starts_over_in_another(tmp_path: Path) -> None:
    first, second = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    run_dir = tmp_path / "run"
    tracker = _tracker(run_dir, first, flush_every_s=0.01)
    old_id = tracker.start(run_name="moving", params={"p": "1"})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    # The run resumes (its checkpoint names the old run id), but the store is another one now.
    moved = _tracker(run_dir, second, flush_every_s=0.01)
    new_id = moved.start(run_name="moving", params={"p": "1"}, run_id=old_id)
    moved.log_metrics({"loss": 0.5}, step=2)
    moved.finish()
    assert new_id is not None and new_id != old_id
    client = MlflowClient(tracking_uri=second)
    assert _history(client, new_id, "loss") == [(1, 1.0), (2, 0.5)]  # the whole journal, replayed there
    assert client.get_run(new_id).data.params == {"p": "1"}
    assert json.loads((run_dir / "tracking" / "run.json").read_text())["uri"] == second

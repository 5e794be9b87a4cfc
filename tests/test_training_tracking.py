"""Training runs in MLflow: the embedded store, a real server, a server that dies mid-run, torchrun."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from registry import Registry
from vlframe.config import files as configfile
from vlframe.training.trainer import Trainer

from conftest import ROOT, clean_env, run_main
from training_configs import TINY, micro


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def _env() -> dict[str, str]:
    env = clean_env("MLFLOW_HTTP")
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_run_lands_in_the_embedded_store(tmp_path: Path, registry: Registry) -> None:
    overrides = micro(tmp_path, **{"tracking.enabled": True, "data.val": {"type": "synthetic", "val_size": 32,
                                                                          "image_size": 64}})
    config, reg = configfile.load(TINY, overrides, registry)
    result = Trainer(config, reg, run_dir=tmp_path / "tracked").fit()
    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    params = run.data.params
    assert params["model.image_encoder.width"] == "64" and params["train.steps"] == "6"
    assert params["data.train.type"] == "synthetic"
    assert run.data.tags["vlframe.config_hash"] == configfile.run_hash(config, reg)
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    # The plugins the config's components come from, and of the tasks its validation ran, with their
    # distribution, version and source digest.
    plugins = json.loads(run.data.tags["vlframe.plugins"])
    assert set(plugins) == {"encoders.vit", "decoders.text", "decoders.multimodal", "poolers", "objectives", "heads",
                            "models.coca", "tokenizers.sentencepiece", "datasets.synthetic", "tasks.retrieval",
                            "parallel.ddp"}
    version = importlib.metadata.version("vlframe")
    assert all(value.startswith(f"vlframe {version}, source sha256:") for value in plugins.values())
    losses = _history(client, result.run_id, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == {h["step"]: h["train/loss"] for h in result.history}
    for key in ("train/loss_caption", "train/loss_contrastive", "train/contrastive/temperature", "train/lr",
                "train/images_per_s", "system/cpu_percent", "val/loss", "val/retrieval/i2t_r1"):
        assert _history(client, result.run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "tokenizer.model", "checkpoint"} <= artifacts
    saved = {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/state.json", "checkpoint/state.safetensors", "checkpoint/tokenizer.model"} <= saved


@pytest.mark.slow
def test_training_survives_a_tracking_server_that_dies(tmp_path: Path, servers) -> None:
    server = servers()
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": server.uri, "tracking.timeout_s": 2,
                                   "tracking.flush_every_s": 0.2, "train.steps": 150, "train.checkpoint_every": None})
    run_dir = tmp_path / "outage"
    exe = Path(sys.executable).with_name("vlframe")
    proc = subprocess.Popen([str(exe), "train", str(TINY), "--run-dir", str(run_dir), *_sets(overrides)], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(tracking_uri=server.uri)
    deadline = time.time() + 180
    seen: dict[int, float] = {}
    while time.time() < deadline and proc.poll() is None:
        info = run_dir / "tracking" / "run.json"
        run_id = json.loads(info.read_text()).get("run_id") if info.is_file() else None
        if run_id:
            seen = _history(client, run_id, "train/loss")
            if len(seen) >= 5:
                break
        time.sleep(0.2)
    assert len(seen) >= 5, "no metrics reached the server before the outage"
    server.kill()
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]  # training went on to the end
    assert "trained 150 steps" in output
    assert f"vlframe tracking sync {run_dir}" in output
    journal = [json.loads(line) for line in (run_dir / "tracking" / "journal.jsonl").read_text().splitlines()]
    steps = sorted(e["step"] for e in journal if e.get("kind") == "metric" and e["key"] == "train/loss")
    assert steps == list(range(1, 151))  # nothing lost: every step is in the journal

    server.start()  # the same store, back on the same port
    sync = run_main("tracking", "sync", str(run_dir))  # the same command, in this process
    assert sync.code == 0, sync.err
    run_id = json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"]
    assert sorted(_history(client, run_id, "train/loss")) == list(range(1, 151))
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_torchrun_two_ranks_train_with_one_tracked_run(tmp_path: Path) -> None:
    from test_distributed import torchrun

    overrides = micro(tmp_path, **{"tracking.enabled": True, "train.steps": 4, "train.checkpoint_every": 2})
    run_dir = tmp_path / "ddp"
    proc = torchrun(2, "-m", "vlframe", "train", str(TINY), "--run-dir", str(run_dir), *_sets(overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) on cpu" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("vlframe")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # rank 0 alone tracks
    assert sorted(_history(client, runs[0].info.run_id, "train/loss")) == [1, 2, 3, 4]


def test_evaluating_a_run_trained_offline_files_everything_under_one_run(tmp_path: Path) -> None:
    from conftest import run_main
    from mlflow_server import _free_port
    from training_configs import sets

    offline = f"http://127.0.0.1:{_free_port()}"  # nothing listens: the whole run is journaled only
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": offline, "tracking.timeout_s": 1,
                                   "train.steps": 3})
    run = tmp_path / "run"
    assert run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides)).code == 0
    evaluated = run_main("eval", str(run), "--task", "retrieval", "--data", "synthetic", "--limit", "8",
                         "--out", str(tmp_path / "eval"))
    assert evaluated.code == 0 and f"vlframe tracking sync {tmp_path / 'eval'}" in evaluated.out
    store = f"sqlite:///{tmp_path / 'store.db'}"
    for folder in (tmp_path / "eval", run):  # in either order, both land in one run
        assert run_main("tracking", "sync", str(folder), "--uri", store).code == 0
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("vlframe").experiment_id])
    assert len(runs) == 1
    assert {"train/loss", "eval/retrieval/i2t_r1"} <= set(runs[0].data.metrics)
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"

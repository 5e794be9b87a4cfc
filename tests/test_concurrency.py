"""Concurrent runs never mix: unique run folders, a lock per folder, a serialised store creation,
and each step logged once across a resume."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clean_env, new_store, run_main
from hardening import popen_vlframe
from training_configs import TINY, micro, sets
from vlframe_builtins.tracking import mlflow_store as store


def _tracked(tmp_path: Path, fresh: bool = False, **extra) -> dict:
    """Tracked to ``tmp_path/mlflow.db``: a copy of an empty store, or (``fresh``) none yet."""
    db = tmp_path / "mlflow.db"
    return micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": f"sqlite:///{db}" if fresh else new_store(db),
                              **extra})


def _points(uri: str, key: str = "train/loss") -> dict[str, list[int]]:
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=uri)
    runs = mlflow.search_runs([e.experiment_id for e in mlflow.search_experiments()])
    return {r.info.run_id: sorted(m.step for m in mlflow.get_metric_history(r.info.run_id, key)) for r in runs}


@pytest.mark.slow  # several processes
def test_two_runs_started_together_get_their_own_folders_and_mlflow_runs(tmp_path: Path) -> None:
    """Both start in the same second on a store neither has created yet."""
    args = ["train", str(TINY), *sets(_tracked(tmp_path, fresh=True, **{"train.steps": 12, "train.checkpoint_every": 6}))]
    procs = [popen_vlframe(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    folders = sorted((tmp_path / "runs").glob("coca_tiny-*"))
    assert len(folders) == 2 and all((f / "checkpoints" / "step_000012").is_dir() for f in folders)
    points = _points(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(points) == 2 and all(steps == list(range(1, 13)) for steps in points.values()), points
    assert not any((f / ".lock").exists() for f in folders)  # released at the end


@pytest.mark.slow  # several processes
def test_a_second_writer_of_a_run_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = sets(micro(tmp_path, **{"train.steps": 100000, "train.checkpoint_every": 5}))
    first = popen_vlframe("train", str(TINY), "--run-dir", str(run), *overrides)
    try:
        deadline = time.time() + 300
        while not list(run.glob("checkpoints/step_*")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[0]
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == first.pid
        for args in (["--run-dir", str(run)], ["--resume", str(run)]):
            result = run_main("train", str(TINY), *args, *overrides)
            assert result.code == 2, result.err
            assert f"{run} is in use: process {first.pid}" in result.err and "is training there" in result.err
            assert result.err.count("\n") == 1  # one line
    finally:
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
    stopped = int(re.search(r"stopped after step (\d+)", out).group(1))
    assert not (run / ".lock").exists()
    # Once the first has gone, the folder is free again.
    result = run_main("train", str(TINY), "--resume", str(run),
                      *sets(micro(tmp_path, **{"train.steps": stopped + 2, "train.checkpoint_every": 5})))
    assert result.code == 0, result.err
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:06d}'} at step {stopped}" in result.err + result.out


def test_a_lock_left_by_a_dead_process_is_taken_over_saying_so(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "here", "since": time.time() - 60,
                                           "command": "vlframe train old.yaml"}))
    result = run_main("train", str(TINY), "--run-dir", str(run), *sets(micro(tmp_path, **{"train.steps": 2})))
    assert result.code == 0, result.err
    assert f"took over {run / '.lock'} from process {dead.pid}" in result.err + result.out
    assert not (run / ".lock").exists()


def test_a_fresh_run_is_refused_in_a_folder_holding_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = sets(micro(tmp_path, **{"train.steps": 3}))
    assert run_main("train", str(TINY), "--run-dir", str(run), *overrides).code == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = run_main("train", str(TINY), "--run-dir", str(run), *overrides)
    assert result.code == 2
    assert f"{run} holds the checkpoints of an earlier run (newest step_000003): continue it with --resume" in result.err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


STORE_USER = """
import sys
from vlframe_builtins.tracking import mlflow_store as store
mlflow = store.client(sys.argv[1])
run = mlflow.create_run(store.experiment_id(mlflow, "race"))
mlflow.log_metric(run.info.run_id, "x", 1.0)
print("ok")
"""


@pytest.mark.slow  # several processes
def test_a_fresh_store_created_by_four_processes_at_once_is_whole(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", STORE_USER, uri], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=clean_env()) for _ in range(4)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outputs
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        tables = {row[0] for row in con.execute("select name from sqlite_master where type = 'table'")}
        assert "runs" in tables and not [t for t in tables if t.startswith("_alembic_tmp_")]
        assert con.execute("select count(*) from runs").fetchone()[0] == 4


BREAK_STORE = """
import sqlite3, sys
from mlflow import MlflowClient
mlflow = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
if sys.argv[2] == "with-run":
    mlflow.create_run(mlflow.create_experiment("kept"))
else:
    mlflow.search_experiments()
with sqlite3.connect(sys.argv[1]) as con:  # what an interrupted batch migration leaves
    con.execute("create table _alembic_tmp_experiments (experiment_id integer)")
"""


def _half_migrated(db: Path, with_run: bool) -> None:
    """A store another process left half-migrated (this one never opened it)."""
    subprocess.run([sys.executable, "-c", BREAK_STORE, str(db), "with-run" if with_run else "empty"], check=True,
                   env=clean_env(), capture_output=True)


def test_a_half_migrated_store_without_runs_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "mlflow.db"
    _half_migrated(db, with_run=False)
    monkeypatch.setattr(store, "_PREPARED", set())
    mlflow = store.client(f"sqlite:///{db}")
    mlflow.create_run(store.experiment_id(mlflow, "fresh"))
    assert "was half-migrated (table _alembic_tmp_experiments left by an interrupted schema migration) and held " \
           "nothing" in caplog.text
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1


def test_a_half_migrated_store_with_runs_is_left_alone_with_the_command_that_repairs_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "mlflow.db"
    _half_migrated(db, with_run=True)
    before = db.read_bytes()
    monkeypatch.setattr(store, "_PREPARED", set())
    with pytest.raises(store.StoreError, match=r"half-migrated .* holds runs or experiments, so vlframe leaves it as "
                                               r"it is: back it up, then run `.* -m mlflow db upgrade sqlite:///"):
        store.client(f"sqlite:///{db}")
    assert db.read_bytes() == before
    # A run pointed at it trains anyway (tracking waits in its journal) and says why.
    result = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"),
                      *sets(micro(tmp_path, **{"train.steps": 2, "tracking.enabled": True,
                                               "tracking.uri": f"sqlite:///{db}"})))
    assert result.code == 0, result.err
    assert "half-migrated" in result.err + result.out and "vlframe tracking sync" in result.err + result.out


def test_a_resumed_run_logs_each_step_once(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = _tracked(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3})
    assert run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides)).code == 0
    # As after a crash at step 6: steps 4 to 6 were logged, the newest checkpoint is step 3.
    result = run_main("train", str(TINY), "--resume", str(run / "checkpoints" / "step_000003"), *sets(overrides))
    assert result.code == 0, result.err
    points = _points(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert list(points.values()) == [[1, 2, 3, 4, 5, 6]], points


def test_a_resume_with_another_config_logs_the_repeated_steps_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = _tracked(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3})
    assert run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides)).code == 0
    changed = {**overrides, "train.lr": 1e-4}
    result = run_main("train", str(TINY), "--resume", str(run / "checkpoints" / "step_000003"), *sets(changed))
    assert result.code == 0, result.err
    assert "steps already logged after it are logged again with the new values" in result.err + result.out
    assert list(_points(f"sqlite:///{tmp_path / 'mlflow.db'}").values()) == [[1, 2, 3, 4, 4, 5, 5, 6, 6]]
    # the checkpoints of the branch left behind were moved aside, not pruned over or resumed from
    assert (run / "checkpoints" / "step_000006").is_dir()
    assert [p.name for p in (run / "checkpoints").glob("superseded-*/*")] == ["step_000006"]


def test_a_run_resumed_into_another_folder_logs_each_step_once(tmp_path: Path) -> None:
    overrides = _tracked(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3})
    assert run_main("train", str(TINY), "--run-dir", str(tmp_path / "first"), *sets(overrides)).code == 0
    result = run_main("train", str(TINY), "--resume", str(tmp_path / "first" / "checkpoints" / "step_000003"),
                      "--run-dir", str(tmp_path / "second"), *sets(overrides))
    assert result.code == 0, result.err
    assert list(_points(f"sqlite:///{tmp_path / 'mlflow.db'}").values()) == [[1, 2, 3, 4, 5, 6]]


@pytest.mark.slow  # several processes
def test_two_runs_racing_for_one_new_folder_leave_the_winners_run_whole(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["train", str(TINY), "--run-dir", str(run), *sets(micro(tmp_path, **{"train.steps": 20}))]
    procs = [popen_vlframe(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outputs
    loser = outputs[[p.returncode for p in procs].index(2)]
    assert "is in use: process" in loser or "holds the checkpoints of an earlier run" in loser, loser
    assert checkpoint_steps(run) == [18, 20]  # keep_checkpoints 2: the winner's, intact
    assert (run / "config.yaml").is_file() and not (run / ".lock").exists()


def checkpoint_steps(run: Path) -> list[int]:
    from vlframe.runs import checkpoint

    return sorted(checkpoint.step_of(p) for p in checkpoint.candidates(run))


@pytest.mark.slow  # several processes
def test_under_torchrun_a_refusal_or_a_blow_up_stops_every_rank_with_the_message(tmp_path: Path) -> None:
    from test_distributed import torchrun

    run = tmp_path / "run"
    overrides = micro(tmp_path, **{"train.steps": 3})
    assert run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides)).code == 0
    proc = torchrun(2, "-m", "vlframe", "train", str(TINY), "--run-dir", str(run), *sets(overrides))
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {run} holds the checkpoints of an earlier run") == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split("torch/distributed/elastic")[0], proc.stderr[-3000:]  # torchrun's own follows
    blow_up = micro(tmp_path, **{"train.lr": 1e30, "train.grad_clip": None, "train.steps": 6, "train.warmup_steps": 0,
                                 "train.checkpoint_every": 1})
    proc = torchrun(2, "-m", "vlframe", "train", str(TINY), "--run-dir", str(tmp_path / "nan"), *sets(blow_up))
    assert proc.returncode != 0
    assert proc.stderr.count("the loss is not finite") == 2, proc.stderr[-3000:]
    assert checkpoint_steps(tmp_path / "nan") == [1]

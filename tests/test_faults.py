"""Faults and exhausted resources: a loss that blows up, a corrupt newest checkpoint, a full disk,
exhausted memory. Each ends in one clear message, exit 2, and what was saved before stays good."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import clean_env, new_store, run_main
from hardening import VLFRAME, train_micro
from training_configs import TINY, micro, sets
from vlframe.runs import checkpoint, formats


def test_a_loss_that_stops_being_finite_stops_training_before_the_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out, err = train_micro(tmp_path, run, **{"train.lr": 1e30, "train.grad_clip": None, "train.steps": 8,
                                                   "train.checkpoint_every": 1, "train.warmup_steps": 0})
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: step 2: the loss is not finite (loss nan, loss_caption "), err
    assert "stopped before the optimiser step, so no weight changed and no checkpoint was written" in lines[0]
    assert "continue with: vlframe train ... --resume" in out + err and "(newest checkpoint: step_000001)" in out + err
    # The checkpoint of the last good step is intact, and nothing after it was written.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    weights = load_file(str(run / "checkpoints" / "step_000001" / checkpoint.WEIGHTS))
    assert all(torch.isfinite(w).all() for w in weights.values())


def _two_checkpoints(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    code, _, err = train_micro(tmp_path, run, **{"train.steps": 6, "train.checkpoint_every": 3})
    assert code == 0, err
    return run


@pytest.mark.parametrize("damage", ["truncated_weights", "corrupt_state", "missing_state_tensors"])
def test_resume_passes_over_a_damaged_newest_checkpoint_saying_which(damage: str, tmp_path: Path) -> None:
    run = _two_checkpoints(tmp_path)
    newest = run / "checkpoints" / "step_000006"
    if damage == "truncated_weights":
        data = (newest / checkpoint.WEIGHTS).read_bytes()
        (newest / checkpoint.WEIGHTS).write_bytes(data[: len(data) // 2])
    elif damage == "corrupt_state":
        (newest / checkpoint.STATE).write_bytes(b'{"step": 6, "optim')
    else:
        (newest / checkpoint.STATE_TENSORS).unlink()
    # eval: naming the damaged checkpoint itself is an error; its run folder passes over it
    result = run_main("eval", str(newest), "--task", "retrieval", "--data", "synthetic", "--limit", "8", "--no-track")
    assert result.code == 2 and "unreadable" in result.err and "Traceback" not in result.err
    result = run_main("eval", str(run), "--task", "retrieval", "--data", "synthetic", "--limit", "8", "--no-track")
    assert result.code == 0 and "step_000006 skipped" in result.err and "retrieval-step_000003" in result.out
    result = run_main("train", str(TINY), "--resume", str(run), *sets(micro(tmp_path, **{"train.steps": 8,
                                                                                       "train.checkpoint_every": 3})))
    assert result.code == 0, result.err
    said = result.out + result.err
    assert f"note: step_000006 skipped: {newest}" in said and "unreadable" in said
    assert f"resumed from {run / 'checkpoints' / 'step_000003'} at step 3" in said
    assert checkpoint.read_state(run / "checkpoints" / "step_000008")["step"] == 8


def test_no_readable_checkpoint_at_all_is_one_clear_error(tmp_path: Path) -> None:
    run = _two_checkpoints(tmp_path)
    for step in ("step_000003", "step_000006"):
        (run / "checkpoints" / step / checkpoint.WEIGHTS).write_bytes(b"\x00" * 10)
    result = run_main("train", str(TINY), "--resume", str(run), *sets(micro(tmp_path, **{"train.steps": 8})))
    assert result.code == 2
    assert result.err.startswith(f"error: --resume {run}: no readable checkpoint there: step_000006 skipped:")
    assert "step_000003 skipped" in result.err and result.err.count("\n") == 1


def test_a_full_disk_mid_save_is_simulated_then_the_run_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from the weights writer on the second checkpoint (the tmpfs test below does it for real)."""
    import safetensors.torch

    real, calls = safetensors.torch.save_model, []

    def fills_up(model, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) >= 2:  # full from the second checkpoint on (the emergency save included)
            Path(filename).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(model, filename, *args, **kwargs)

    monkeypatch.setattr(formats, "save_model", fills_up)
    run = tmp_path / "run"
    code, out, err = train_micro(tmp_path, run, **{"train.steps": 6, "train.checkpoint_every": 3})
    assert code == 2
    assert f"error: no space left on the device writing {run / 'checkpoints' / 'step_000006'}: it needs about" in err
    assert not list((run / "checkpoints").glob(".step_*"))  # the partial folder is gone
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000003"]
    monkeypatch.setattr(formats, "save_model", real)
    result = run_main("train", str(TINY), "--resume", str(run), *sets(micro(tmp_path, **{"train.steps": 6,
                                                                                       "train.checkpoint_every": 3})))
    assert result.code == 0, result.err
    assert checkpoint.read_state(run / "checkpoints" / "step_000006")["step"] == 6


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 6 MiB file system (tmpfs): room for one micro checkpoint, not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (or CAP_SYS_ADMIN): {made.stderr.strip()}; "
                    "test_a_full_disk_mid_save_is_simulated covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_really_full_disk_loses_nothing_and_the_run_resumes_once_there_is_space(
        tmp_path: Path, small_disk: Path) -> None:
    run = small_disk / "run"
    overrides = micro(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 3, "tracking.enabled": True,
                                   "tracking.uri": new_store(tmp_path / "mlflow.db")})
    result = run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides))
    assert result.code == 2
    errors = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: no space left on the device writing "), result.err
    assert "MiB are free there; the checkpoints before it are intact" in errors[0]
    leftovers = [p.name for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers  # no partial checkpoint, no temporary tokenizer or journal file
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000003"]
    assert checkpoint.find_readable(run) == (run / "checkpoints" / "step_000003", [])
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    result = run_main("train", str(TINY), "--resume", str(run), *sets(overrides))
    assert result.code == 0, result.err
    assert checkpoint.read_state(run / "checkpoints" / "step_000006")["step"] == 6
    from mlflow import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((run / "tracking" / "run.json").read_text())["run_id"]
    assert [m.step for m in sorted(mlflow.get_metric_history(run_id, "train/loss"), key=lambda m: m.step)] == \
        [1, 2, 3, 4, 5, 6]
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_exhausted_memory_says_at_which_batch_size_and_what_to_change(tmp_path: Path) -> None:
    """A real allocation failure: the trainer's address space is capped at 6 GiB and one
    micro-batch of 2048 images at 224 px needs more. The advice it gives (grad_accum) then works."""
    limit = 6 << 30

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    big = {"data.train.size": 2048, "data.train.image_size": 224, "model.image_encoder.image_size": 224,
           "train.batch_size": 2048, "train.steps": 1, "train.checkpoint_every": None}

    def train(**extra) -> subprocess.CompletedProcess:
        return subprocess.run([str(VLFRAME), "train", str(TINY), "--run-dir", str(tmp_path / "run"),
                               *sets(micro(tmp_path, **big, **extra))], capture_output=True, text=True,
                              env=clean_env(), preexec_fn=capped, timeout=1800)

    proc = train()
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("error: out of memory at step 1 (the CPU allocator could not get ")
    assert "with train.batch_size 2048 (1 rank(s) x 1 micro-batch(es) of 2048): lower train.batch_size, or keep " \
           "it and raise train.grad_accum" in errors[0]
    proc = train(**{"train.grad_accum": 16})
    assert proc.returncode == 0, proc.stderr[-3000:]

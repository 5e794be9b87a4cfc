"""The training loop on the built-in synthetic data: learning, exact resume, crashes, skips."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from registry import Kind, Registry
from vlframe.api import build_tokenizer
from vlframe.config import files as configfile
from vlframe.runs import checkpoint, formats
from vlframe.runs.folder import RunDir
from vlframe.data.loading import DataError
from vlframe.training.trainer import Trainer

from conftest import ROOT, clean_env, new_store
from training_configs import TINY, micro


def train(tmp_path: Path, name: str, overrides: dict, resume: Path | None = None, registry=None):
    config, registry = configfile.load(TINY, overrides, registry)
    return Trainer(config, registry, run_dir=tmp_path / name, resume=resume).fit()


def losses(history: list[dict]) -> dict[int, tuple[float, ...]]:
    return {h["step"]: (h["train/loss"], h["train/loss_caption"], h["train/loss_contrastive"]) for h in history}


def test_synthetic_scenes_are_learnable_in_a_short_cpu_run(tmp_path: Path, registry: Registry) -> None:
    overrides = micro(tmp_path, **{
        "train.steps": 120, "train.lr": 2e-3, "train.warmup_steps": 10, "train.checkpoint_every": None,
        "model.image_encoder.width": 96, "model.text_decoder.width": 96, "model.multimodal_decoder.width": 96,
        "data.train.size": 4096,
    })
    result = train(tmp_path, "learn", overrides, registry=registry)
    history = result.history
    # What a model that learnt nothing of the captions' order, nor of which caption is whose, can at
    # best reach: the entropy of their tokens taken one by one, and log(batch) (in-batch matching
    # by chance). Both are properties of the data, the same on every CPU.
    config, registry = configfile.load(TINY, overrides, registry)
    tokenizer = build_tokenizer(config, registry, path=result.run_dir / "tokenizer.model")
    counts: collections.Counter[int] = collections.Counter()
    for caption in registry.catalog.build(Kind.DATASET, config.data.train, split="train").captions():
        ids, mask = tokenizer.encode([caption], config.model.context_length)
        counts.update(ids[0][mask[0]][1:].tolist())  # the tokens the captioning loss predicts
    total = sum(counts.values())
    unigram = -sum(c / total * math.log(c / total) for c in counts.values())
    end = sum(h["train/loss_caption"] for h in history[-5:]) / 5
    assert end < unigram, (end, unigram)  # the captions' words and their order are learnt
    con_end = sum(h["train/loss_contrastive"] for h in history[-5:]) / 5
    assert con_end < math.log(config.train.batch_size), con_end  # images and captions start to match


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_same_config_same_losses_and_resume_continues_exactly(precision: str, tmp_path: Path,
                                                              registry: Registry) -> None:
    overrides = micro(tmp_path, **{"data.num_workers": 2, "train.precision": precision})
    full = train(tmp_path, "full", overrides, registry=registry)
    again = train(tmp_path, "again", overrides, registry=registry)
    assert losses(full.history) == losses(again.history)  # bit-for-bit deterministic
    middle = tmp_path / "full" / "checkpoints" / "step_000003"
    assert checkpoint.find(middle) == middle
    assert RunDir.of(middle) == RunDir.of(tmp_path / "full") == RunDir(tmp_path / "full")
    resumed = train(tmp_path, "resumed", overrides, resume=middle, registry=registry)
    assert [h["step"] for h in resumed.history] == [4, 5, 6]
    assert losses(resumed.history) == {s: v for s, v in losses(full.history).items() if s > 3}
    # The tokenizer came back with the checkpoint rather than being trained again.
    assert (middle / "tokenizer.model").read_bytes() == (tmp_path / "resumed" / "tokenizer.model").read_bytes()
    final = checkpoint.read_state(resumed.checkpoint)
    assert final["step"] == 6


def _write_manifest(root: Path, registry: Registry) -> Path:
    """Real image files (synthetic scenes saved as PNG/JPEG) plus broken entries of each kind."""
    entry = registry.catalog.get(Kind.DATASET, "synthetic")
    scenes = entry.spec.factory(registry.validate(entry.spec.config, {"type": "synthetic", "size": 40,
                                                                        "image_size": 64}), split="train")
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i in range(len(scenes)):
        sample = scenes[i]
        sample.image.save(images / f"{i:03d}.png")
        lines.append({"image": f"images/{i:03d}.png", "captions": sample.captions})
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = images / "000.png"
    (images / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    lines += [
        {"image": "images/missing.jpg", "captions": ["a lost image."]},
        {"image": "images/corrupt.jpg", "captions": ["a broken image."]},
        {"image": "images/truncated.png", "captions": ["half an image."]},
        {"image": "images/001.png", "captions": ["", "   "]},
    ]
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def test_missing_corrupt_and_empty_samples_are_skipped_and_counted(tmp_path: Path, registry: Registry,
                                                                   capsys: pytest.CaptureFixture) -> None:
    manifest = _write_manifest(tmp_path / "data", registry)
    overrides = micro(tmp_path, **{
        "data.train": {"type": "manifest", "path": str(manifest)}, "data.max_skip_fraction": 0.2,
        "train.steps": 8, "train.batch_size": 8, "train.checkpoint_every": None,
    })
    result = train(tmp_path, "skips", overrides, registry=registry)
    state = checkpoint.read_state(result.checkpoint)
    skipped = state["skipped"]
    names = {Path(k).name: reason for k, reason in skipped.items()}
    assert names.keys() == {"missing.jpg", "corrupt.jpg", "truncated.png", "001.png"}
    assert names["missing.jpg"] == "file not found"
    assert names["corrupt.jpg"].startswith("cannot decode image")
    assert names["001.png"] == "no non-empty caption"
    assert result.history[-1]["train/skipped"] == 4.0
    assert "4 unusable sample(s) skipped" in capsys.readouterr().err

    # Past the configured fraction the run stops, naming the files.
    strict = {**overrides, "data.max_skip_fraction": 0.02}
    with pytest.raises(DataError) as err:
        train(tmp_path, "strict", strict, registry=registry)
    assert "more than data.max_skip_fraction 2.0%" in str(err.value)
    assert "missing.jpg (file not found)" in str(err.value) and "001.png (no non-empty caption)" in str(err.value)


def _vlframe(*args: str, **kwargs) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("vlframe")
    env = clean_env()
    return subprocess.Popen([str(exe), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def _sets(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_crash_mid_run_leaves_a_checkpoint_to_resume(tmp_path: Path, how: str) -> None:
    overrides = micro(tmp_path, **{"train.steps": 400, "train.checkpoint_every": 2})
    run = tmp_path / "crash"
    proc = _vlframe("train", str(TINY), "--run-dir", str(run), *_sets(overrides))
    deadline = time.time() + 120
    while checkpoint.find(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert checkpoint.find(run) is not None, proc.communicate()[0]
    proc.send_signal(getattr(signal, how))
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    saved = checkpoint.find(run)
    step = checkpoint.read_state(saved)["step"]
    assert 0 < step < 400
    if how == "SIGTERM":  # a polite stop checkpoints the step it reached and says how to resume
        assert f"stopped after step {step}; continue with: vlframe train ... --resume {run}" in output
        assert f"newest checkpoint: step_{step:06d}" in output
    partial = list((run / "checkpoints").glob(".step_*"))
    if how == "SIGTERM":
        assert not partial  # a polite stop never leaves a half-written checkpoint
    # a SIGKILL may land mid-save: the partial folder is never resumed from (find() chose a complete
    # step_* above) and the next save sweeps it away
    finish = dict(overrides, **{"train.steps": step + 2})
    resumed = _vlframe("train", str(TINY), "--resume", str(run), *_sets(finish))
    out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, out
    assert not list((run / "checkpoints").glob(".step_*"))
    assert f"resumed from {saved} at step {step}" in out
    assert f"trained {step + 2} steps" in out


def test_partial_checkpoints_of_dead_writers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "checkpoints"
    gone = folder / f".step_000004.tmp{dead.pid}"
    live = folder / f".step_000004.tmp{os.getppid()}"  # another writer that is still running
    for partial in (gone, live):
        partial.mkdir(parents=True)
        (partial / checkpoint.WEIGHTS).write_bytes(b"half")
    assert checkpoint.find(tmp_path) is None  # a partial folder is never a checkpoint
    assert checkpoint.sweep_partial(folder) == [gone]
    assert live.is_dir() and not gone.exists()


def test_loading_what_fits_counts_tied_weights_as_loaded(tmp_path: Path) -> None:
    from safetensors.torch import save_model
    from torch import nn

    def tied(extra: int) -> nn.Module:
        model = nn.Module()
        model.embed, model.head, model.extra = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False), nn.Linear(extra, 2)
        model.head.weight = model.embed.weight
        return model

    source, target = tied(2), tied(4)
    save_model(source, str(tmp_path / checkpoint.WEIGHTS))  # the tied pair is stored once
    fresh, unused = formats.load_fitting(tmp_path, target)
    assert fresh == ["extra.weight"] and unused == ["extra.weight"]  # resized: kept fresh, the saved one unused
    assert torch.equal(target.head.weight, source.embed.weight)


def test_a_failed_resume_changes_nothing_in_the_folder_it_names(tmp_path: Path) -> None:
    from conftest import run_main
    from training_configs import sets

    overrides = micro(tmp_path, **{"train.steps": 3, "train.checkpoint_every": None})
    assert run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides)).code == 0
    # A folder that is a checkpoint but not a training one (a conversion has no optimiser state).
    conv = tmp_path / "conv"
    (tmp_path / "run" / "checkpoints" / "step_000003").rename(conv)
    state = checkpoint.read_state(conv)
    checkpoint.write_state(conv, {"step": 0, "converted_from": {"importer": "x"}, "config_hash": state["config_hash"]})
    before = {p.name: p.read_bytes() for p in conv.iterdir()}
    result = run_main("train", str(TINY), "--resume", str(conv), *sets(overrides))
    assert result.code == 2 and "not a training checkpoint" in result.err
    assert {p.name: p.read_bytes() for p in conv.iterdir()} == before
    # Nor does a config the checkpoint does not fit; and the error is one line.
    result = run_main("train", str(TINY), "--resume", str(conv), *sets({**overrides, "model.embed_dim": 48}))
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1 and "size mismatch" in result.err
    assert {p.name: p.read_bytes() for p in conv.iterdir()} == before


def test_a_failure_during_set_up_ends_the_tracked_run_as_failed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from conftest import run_main
    from training_configs import sets

    uri = new_store(tmp_path / "mlflow.db")
    # Fewer training samples than one batch: the loader refuses, after the run was opened.
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": uri, "data.train.size": 8})
    result = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides))
    assert result.code == 2 and "fewer than one batch" in result.err
    runs = MlflowClient(tracking_uri=uri).search_runs([MlflowClient(tracking_uri=uri).get_experiment_by_name(
        "vlframe").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]

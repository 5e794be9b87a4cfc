"""Sweeps: a 3-variant micro sweep in a real MLflow store, resumed, with one variant failing, then moved."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import CONFIGS, new_store, run_cli, run_main
from training_configs import micro
from vlframe.sweeps.sweep import expand, load_sweep


def _sweep_file(tmp_path: Path, store: bool = True) -> Path:
    """The micro sweep, tracked to ``tmp_path/mlflow.db`` (``store``: made now, empty; else not yet)."""
    db = tmp_path / "mlflow.db"
    common = micro(tmp_path, **{
        "tracking.enabled": True, "tracking.uri": new_store(db) if store else f"sqlite:///{db}",
        "data.val": {"type": "synthetic", "val_size": 32, "image_size": 64},
        "train.steps": 4, "train.checkpoint_every": None,
    })
    garbage = tmp_path / "not-a-tokenizer.model"
    garbage.write_bytes(b"\x00 this is not a sentencepiece model")
    sweep = {
        "name": "micro",
        "base": str(CONFIGS / "coca_tiny.yaml"),
        "set": common,
        "output_dir": str(tmp_path / "sweeps"),
        "evaluation": {"tasks": {
            "retrieval": {"type": "retrieval", "limit": 32},
            "caption": {"type": "caption", "limit": 8, "metrics": ["cider"]},
            "zeroshot_colour": {"type": "zeroshot", "templates": ["a {} shape."],
                                "data": {"type": "synthetic", "label": "color", "max_objects": 1, "val_size": 14,
                                         "image_size": 64}},
        }},
        "variants": {
            "coca": {},
            "contrastive_only": {"model.multimodal_decoder": None, "model.caption_pooler": None,
                                 "model.lm_head": None, "model.objectives.caption": None},
            # The file exists (the config validates), but it is no tokenizer: training fails.
            "broken": {"tokenizer.path": str(garbage)},
        },
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_grid_axes_cross_every_variant(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "base": str(CONFIGS / "coca_tiny.yaml"),
                                    "variants": {"a": {}, "b": {"train.lr": 1e-3}},
                                    "grid": {"model.objectives.caption.weight": [1.0, 2.0]}}))
    names = [name for name, _ in expand(load_sweep(path))]
    assert names == ["a[weight=1.0]", "a[weight=2.0]", "b[weight=1.0]", "b[weight=2.0]"]
    assert dict(expand(load_sweep(path)))["b[weight=2.0]"] == {"train.lr": 1e-3,
                                                             "model.objectives.caption.weight": 2.0}


def test_a_sweep_without_an_output_dir_puts_its_runs_beside_its_base_configs(tmp_path: Path) -> None:
    """Under the base config's train.output_dir (with the sweep's and the command line's --set), not
    under whatever folder the sweep was started from."""
    from vlframe.sweeps.sweep import sweep_folder

    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {CONFIGS / 'coca_tiny.yaml'}\ntrain:\n  output_dir: {tmp_path / 'mine'}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "where", "base": str(base)}))
    assert sweep_folder(load_sweep(path)) == tmp_path / "mine" / "sweeps" / "where"
    assert sweep_folder(load_sweep(path, [f"train.output_dir={tmp_path / 'cli'}"])) == tmp_path / "cli" / "sweeps" / "where"
    path.write_text(yaml.safe_dump({"name": "where", "base": str(base), "set": {"train.output_dir": str(tmp_path / "set")}}))
    assert sweep_folder(load_sweep(path)) == tmp_path / "set" / "sweeps" / "where"
    path.write_text(yaml.safe_dump({"name": "where", "base": str(base), "output_dir": str(tmp_path / "own")}))
    assert sweep_folder(load_sweep(path)) == tmp_path / "own" / "where"


@pytest.mark.slow
def test_micro_sweep_tracks_resumes_records_failures_and_compares(tmp_path: Path) -> None:
    sweep_file = _sweep_file(tmp_path)
    first = run_cli("sweep", str(sweep_file))
    assert first.code == 1, first.err[-3000:]  # one variant failed; the others completed
    assert "2 finished, 0 skipped, 1 failed" in first.out

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlframe")
    parents = client.search_runs([experiment.experiment_id], "tags.`vlframe.sweep_parent` = 'true'")
    assert len(parents) == 1 and parents[0].data.tags["vlframe.sweep"] == "micro"
    parent = parents[0].info.run_id
    kids = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    by_name = {r.data.tags["vlframe.variant"]: r for r in kids}
    assert set(by_name) == {"coca", "contrastive_only", "broken"}
    coca, contrastive, broken = by_name["coca"], by_name["contrastive_only"], by_name["broken"]
    assert coca.info.status == contrastive.info.status == "FINISHED" and broken.info.status == "FAILED"
    error = broken.data.tags["vlframe.error"]
    assert error.startswith("training exited with code") and "not-a-tokenizer.model" in error, error
    assert json.loads(contrastive.data.tags["vlframe.overrides"]) == sorted(
        ["model.multimodal_decoder", "model.caption_pooler", "model.lm_head", "model.objectives.caption"])
    assert json.loads(coca.data.tags["vlframe.overrides"]) == []
    assert coca.data.tags["vlframe.config_hash"] != contrastive.data.tags["vlframe.config_hash"]
    assert coca.data.params["train.steps"] == "4" and coca.data.params["model.text_decoder.width"] == "64"
    for run in (coca, contrastive):
        for key in ("eval/retrieval/i2t_r1", "eval/zeroshot_colour/top1", "cost/params_m", "cost/s_per_step",
                    "cost/images_per_s", "val/loss_contrastive"):
            assert key in run.data.metrics, (run.data.tags["vlframe.variant"], key)
    assert "eval/caption/cider" in coca.data.metrics and "eval/caption/cider" not in contrastive.data.metrics
    # The variant that cannot caption says why instead of leaving a hole.
    assert contrastive.data.tags["vlframe.eval_skipped.caption"] == "no captioning capability"

    second = run_main("sweep", str(sweep_file))
    assert "[coca] skipped" in second.out and "[contrastive_only] skipped" in second.out
    assert "0 finished, 2 skipped, 1 failed" in second.out
    kids_after = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sum(r.data.tags["vlframe.variant"] == "coca" for r in kids_after) == 1  # nothing retrained

    out = tmp_path / "comparison"
    compared = run_main("compare", str(sweep_file), "--out", str(out))
    assert compared.code == 0, compared.err[-2000:]
    lines = compared.out.splitlines()
    assert lines[0].split()[:2] == ["variant", "status"] and "*" in compared.out
    assert [line.split()[0] for line in lines[2:5]] == ["coca", "contrastive_only", "broken"]
    assert "n/a" in lines[3] and "contrastive_only: caption not run (no captioning capability)" in compared.out
    with (out / "comparison.csv").open() as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    coca_now = client.get_run(coca.info.run_id).data.metrics
    for key in ("eval/retrieval/i2t_r1", "eval/zeroshot_colour/top1", "eval/caption/cider", "cost/params_m"):
        assert float(rows["coca"][key]) == pytest.approx(coca_now[key])
    assert rows["contrastive_only"]["eval/caption/cider"] == "n/a" and rows["broken"]["status"] == "failed"
    assert rows["broken"]["eval/caption/cider"] == ""  # failed: no value, and no reason to say n/a
    assert (out / "comparison.png").stat().st_size > 1000 and "**" in (out / "comparison.md").read_text()
    logged = {Path(a.path).name for a in client.list_artifacts(parent, "comparison")}
    assert logged == {"comparison.csv", "comparison.md", "comparison.png"}

    # The evaluation changes (a task's settings): the finished variants are evaluated again, not retrained.
    data = yaml.safe_load(sweep_file.read_text())
    data["evaluation"]["tasks"]["retrieval"]["limit"] = 16
    sweep_file.write_text(yaml.safe_dump(data, sort_keys=False))
    third = run_main("sweep", str(sweep_file), "--only", "coca", "contrastive_only")
    assert third.code == 0, third.out[-3000:] + third.err[-2000:]
    assert "[coca] trained before; its evaluation changed: evaluating again" in third.out
    assert "training:" not in third.out and "0 skipped" in third.out
    coca_again = client.get_run(coca.info.run_id)
    assert coca_again.data.tags["vlframe.eval_hash"] != coca.data.tags["vlframe.eval_hash"]
    assert len(client.get_metric_history(coca.info.run_id, "train/loss")) == 4  # one training

    # The same sweep pointed at another store: the variant is trained there, under a parent of its own.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    moved = run_main("sweep", str(sweep_file), "--only", "contrastive_only", "--set", f"tracking.uri={other}")
    assert moved.code == 0, moved.out[-2000:] + moved.err[-2000:]
    assert f"at {other}" in moved.out and "1 finished, 0 skipped" in moved.out
    there = MlflowClient(tracking_uri=other)
    parents = there.search_runs([there.get_experiment_by_name("vlframe").experiment_id],
                                "tags.`vlframe.sweep_parent` = 'true'")
    assert len(parents) == 1 and parents[0].info.run_id != parent


def test_sweep_input_errors_touch_nothing(tmp_path: Path) -> None:
    sweep_file = _sweep_file(tmp_path, store=False)
    result = run_main("sweep", str(sweep_file), "--set", "garbage")
    assert result.code == 2 and result.err.strip() == "error: --set: expected KEY=VALUE, got 'garbage'"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweeps").exists()
    listed = run_main("sweep", str(sweep_file), "--list", "--set", "model.embed_dim=-1")
    assert listed.code == 2 and "model.embed_dim" in listed.out
    assert run_main("sweep", str(sweep_file), "--steps", "0", "--list").code == 2

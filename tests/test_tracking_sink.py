"""A tracking sink for another tracker is one plugin module: ``tests/fixtures/folder_sink``.

The fixture keeps runs as plain folders (``folder:///PATH``), written from the contract alone
(``registry.protocols.TrackingSink``). Installed with pip, with no engine change, it passes the
conformance kit, and everything vlframe tracks goes through it: a training run (params, metrics,
status, the checkpoint artifact), a model loaded back by its run id from the sink alone, a sweep
that skips what finished and a comparison read back from the sink.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, pip_install, run_main
from training_configs import TINY, micro, sets

pytestmark = pytest.mark.slow  # trains models

FIXTURE = ROOT / "tests" / "fixtures" / "folder_sink"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install(FIXTURE, tmp_path_factory.mktemp("sink"))


@pytest.fixture
def installed(site: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fixture package on the path of this process and of those it starts (sweep variants), as
    pip would leave it in site-packages."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def _runs(store: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in store.glob("*/run.json")}


def test_a_run_goes_to_the_plugin_sink_and_loads_back_by_its_id(installed: Path, tmp_path: Path) -> None:
    assert run_main("plugins", "check", "folder").code == 0
    listed = run_main("plugins", "list", "--kind", "tracking_sink").out
    assert "folder" in listed and "mlflow" in listed
    store, run = tmp_path / "store", tmp_path / "run"
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": f"folder://{store}", "train.steps": 4,
                                   "train.checkpoint_every": 2})
    result = run_main("train", str(TINY), "--run-dir", str(run), *sets(overrides))
    assert result.code == 0, result.err[-2000:]
    (run_id, tracked), = _runs(store).items()
    assert f"folder-sink run {run_id}" in result.err
    assert tracked["status"] == "FINISHED" and tracked["params"]["train.steps"] == "4"
    assert tracked["tags"]["vlframe.run_dir"] == str(run.resolve())
    assert {"train/loss", "train/lr"} <= set(tracked["metrics"])
    steps = [json.loads(line)["step"] for line in (store / run_id / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["key"] == "train/loss"]
    assert steps == [1, 2, 3, 4]
    assert (store / run_id / "artifacts" / "checkpoint" / "model.safetensors").is_file()
    # By its id, from the sink alone: the run folder is gone, the sink's checkpoint artifact loads.
    shutil.rmtree(run)
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    captioned = run_main("caption", run_id, str(image), "--tracking-uri", f"folder://{store}",
                         env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert captioned.code == 0, captioned.err[-2000:]
    assert captioned.out.startswith(f"{image}: ")
    assert (tmp_path / "cache" / "vlframe" / "runs" / run_id / "checkpoint" / "model.safetensors").is_file()


def test_a_sweep_and_its_comparison_read_back_through_the_plugin_sink(installed: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = tmp_path / "base.yaml"
    base.write_text(f"extends: {TINY}\n")
    sweep = tmp_path / "sweep.yaml"
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": f"folder://{store}", "train.steps": 2})
    sweep.write_text(json.dumps({"name": "folders", "base": str(base), "set": overrides,
                                 "variants": {"coca": {}, "wide": {"model.embed_dim": 48}},
                                 "evaluation": {"tasks": {"retrieval": {"type": "retrieval", "limit": 16,
                                                                        "data": "synthetic"}}}}))
    first = run_main("sweep", str(sweep))
    assert first.code == 0, first.out[-2000:] + first.err[-2000:]
    assert "2 finished, 0 skipped, 0 failed" in first.out
    runs = _runs(store)
    variants = {r["tags"].get("vlframe.variant") for r in runs.values()} - {None}
    assert variants == {"coca", "wide"}
    assert all("eval/retrieval/i2t_r1" in r["metrics"] for r in runs.values() if r["tags"].get("vlframe.variant"))
    second = run_main("sweep", str(sweep))  # what finished is found in the sink and skipped
    assert "0 finished, 2 skipped, 0 failed" in second.out, second.out[-2000:]
    compared = run_main("compare", str(sweep))
    assert compared.code == 0, compared.err[-2000:]
    assert "coca" in compared.out and "wide" in compared.out and "retrieval i2t_r1" in compared.out
    parent = next(r for r in runs.values() if r["tags"].get("vlframe.sweep_parent") == "true")
    assert (store / next(k for k, v in runs.items() if v is parent) / "artifacts" / "comparison" /
            "comparison.csv").is_file()


def test_a_uri_no_sink_serves_is_one_line_before_training(tmp_path: Path) -> None:
    overrides = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": "nosuch://where"})
    result = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides))
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert result.code == 2 and len(lines) == 1, result.err[-2000:]
    assert "no tracking sink serves 'nosuch://where' (scheme 'nosuch'); sinks: mlflow [tracking.mlflow]" in lines[0]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing left behind

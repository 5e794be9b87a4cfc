"""Seeded sweeps: intervals and paired tests checked against scipy, and a 2-variant x 2-seed micro
sweep in a real MLflow store (seed runs nested under their variant, finished seeds skipped on
rerun, the comparison with intervals, tests, error bars)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from scipy import stats as scipy_stats

from conftest import CONFIGS, new_store, run_main
from training_configs import micro
from vlframe.sweeps import stats
from vlframe.sweeps.comparison import Column, Row, cells, significantly_best


def test_interval_matches_scipy() -> None:
    values = [71.2, 69.8, 73.1, 70.4]
    got = stats.summary(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 4, scale=scipy_stats.sem(values))
    assert got.n == 4 and got.mean == pytest.approx(sum(values) / 4)
    assert got.std == pytest.approx(scipy_stats.tstd(values))
    assert (got.low, got.high) == (pytest.approx(low), pytest.approx(high))
    one = stats.summary([5.0])
    assert one.n == 1 and one.low is None and one.std is None


def test_paired_test_matches_scipy_and_tells_signal_from_noise() -> None:
    baseline = {0: 50.0, 1: 55.0, 2: 45.0}
    # Better on every seed by about 2 points, although seeds spread by 10: significant when paired.
    better = {0: 52.1, 1: 56.9, 2: 47.0}
    got = stats.paired(better, baseline)
    ref = scipy_stats.ttest_rel([better[s] for s in range(3)], [baseline[s] for s in range(3)])
    assert got.p == pytest.approx(ref.pvalue) and got.significant()
    assert got.difference == pytest.approx(2.0, abs=0.01) and got.low > 0
    # Up on one seed, down on another: the same mean gain is noise.
    noisy = {0: 56.0, 1: 53.0, 2: 47.0}
    got = stats.paired(noisy, baseline)
    ref = scipy_stats.ttest_rel([noisy[s] for s in range(3)], [baseline[s] for s in range(3)])
    assert got.p == pytest.approx(ref.pvalue) and not got.significant() and got.low < 0 < got.high
    # Only seeds both ran are paired.
    assert stats.paired({0: 1.0, 1: 2.0, 5: 9.0}, {0: 0.5, 1: 1.0}).n == 2


def test_the_paired_bootstrap_over_items_tells_signal_from_noise() -> None:
    import numpy as np
    from scipy.stats import norm

    rng = np.random.default_rng(0)
    keys = [f"img{i}" for i in range(400)]
    base = {k: float(v) for k, v in zip(keys, 100.0 * (rng.random(400) < 0.5))}
    # The variant gets 40 more of the 400 queries right (and none fewer): a real 10-point gain.
    flip = [k for k in keys if base[k] == 0.0][:40]
    better = {k: 100.0 if k in flip else v for k, v in base.items()}
    got = stats.paired_bootstrap({0: better}, {0: base})
    assert got.items == 400 and got.difference == pytest.approx(10.0) and got.significant() and got.low > 0
    # Per-item differences of +-1 with a small mean: the bootstrap distribution of the mean is
    # close to normal, so its p-value must be close to the normal test's.
    diffs = np.where(rng.random(400) < 0.53, 1.0, -1.0)
    noisy = stats.paired_bootstrap({0: dict(zip(keys, diffs.tolist()))}, {0: dict.fromkeys(keys, 0.0)})
    z = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(400))
    assert noisy.p == pytest.approx(2 * norm.sf(abs(z)), abs=0.02) and not noisy.significant()
    assert noisy.low < noisy.difference < noisy.high
    # Several seeds: each item's difference is averaged over them before resampling; only items
    # scored in every shared seed count.
    two = stats.paired_bootstrap({0: {"a": 1.0, "b": 3.0, "c": 9.0}, 1: {"a": 3.0, "b": 5.0}, 7: {"a": 0.0}},
                                 {0: {"a": 0.0, "b": 0.0, "c": 0.0}, 1: {"a": 0.0, "b": 2.0}})
    assert (two.items, two.seeds) == (2, 2) and two.difference == pytest.approx((2.0 + 3.0) / 2)
    same = stats.paired_bootstrap({0: {"a": 1.0, "b": 1.0}}, {0: {"a": 1.0, "b": 1.0}})
    assert same.difference == 0 and same.p is None and not same.significant()


def test_retrieval_items_average_to_its_recall() -> None:
    import torch

    from vlframe.evaluation.metrics import recall_from_ranks, retrieval_ranks, retrieval_recall

    torch.manual_seed(0)
    images, texts = torch.randn(12, 8), torch.randn(30, 8)
    owners = torch.arange(30) % 12
    i2t, t2i = retrieval_ranks(images, texts, owners)
    assert recall_from_ranks(i2t, t2i) == retrieval_recall(images, texts, owners)
    assert i2t.shape == (12,) and t2i.shape == (30,)
    assert recall_from_ranks(i2t, t2i)["t2i_r5"] == pytest.approx(100.0 * (t2i < 5).float().mean().item())


def _row(name: str, by_seed: dict[int, float]) -> Row:
    row = Row(name, "finished", name, [], seeds={s: {"eval/x": v} for s, v in by_seed.items()})
    row.metrics = {"eval/x": row.summary("eval/x").mean}
    return row


def test_the_best_is_starred_only_when_significantly_best() -> None:
    column = Column("eval/x", "x", True)
    clear = [_row("a", {0: 52.1, 1: 56.9, 2: 47.0}), _row("b", {0: 50.0, 1: 55.0, 2: 45.0})]
    assert significantly_best(clear, column).variant == "a"
    table = cells(clear, [column], baseline="b")
    assert table[0][2].endswith("†*") and "±" in table[0][2] and not table[1][2].endswith("*")
    within = [_row("a", {0: 56.0, 1: 53.0, 2: 47.0}), _row("b", {0: 50.0, 1: 55.0, 2: 45.0})]
    assert significantly_best(within, column) is None
    assert not any(cell.endswith("*") for line in cells(within, [column]) for cell in line)


@pytest.mark.slow
def test_a_two_variant_two_seed_sweep_nests_skips_and_compares(tmp_path: Path) -> None:
    common = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": new_store(tmp_path / "mlflow.db"),
                                "train.steps": 3, "train.checkpoint_every": None})
    sweep = {"name": "seeded", "base": str(CONFIGS / "coca_tiny.yaml"), "set": common, "seeds": [0, 1],
             "output_dir": str(tmp_path / "sweeps"),
             "evaluation": {"tasks": {"retrieval": {"type": "retrieval", "limit": 32}}},
             "variants": {"coca": {}, "wide_temp": {"model.objectives.contrastive.init_temperature": 0.2}}}
    path = tmp_path / "seeded.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    first = run_main("sweep", str(path))
    assert first.code == 0, first.out[-3000:] + first.err[-2000:]
    assert "4 finished, 0 skipped, 0 failed" in first.out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vlframe")
    parent = client.search_runs([experiment.experiment_id], "tags.`vlframe.sweep_parent` = 'true'")[0].info.run_id
    groups = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["vlframe.variant"] for r in groups) == ["coca", "wide_temp"]
    assert all(r.data.tags["vlframe.variant_group"] == "true" for r in groups)
    for group in groups:
        seeds = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{group.info.run_id}'")
        assert sorted(r.data.tags["vlframe.seed"] for r in seeds) == ["0", "1"]
        assert {r.data.params["train.seed"] for r in seeds} == {"0", "1"}
        assert all("eval/retrieval/i2t_r1" in r.data.metrics for r in seeds)
    # Rerun: every seed finished before is skipped; one more seed trains only that seed.
    second = run_main("sweep", str(path))
    assert "0 finished, 4 skipped, 0 failed" in second.out, second.out[-2000:]
    third = run_main("sweep", str(path), "--seeds", "3", "--only", "coca")
    assert "1 finished, 2 skipped, 0 failed" in third.out and "[coca/seed2] training" in third.out, third.out[-2000:]

    out = tmp_path / "comparison"
    compared = run_main("compare", str(path), "--out", str(out), "--baseline", "coca")
    assert compared.code == 0, compared.err[-2000:]
    assert "±" in compared.out and "95% Student-t interval over 2/3 seeds" in compared.out
    with (out / "comparison.csv").open() as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    key = "eval/retrieval/i2t_r1"
    assert rows["coca"][f"{key} n"] == "3" and rows["wide_temp"][f"{key} n"] == "2"
    coca_values = [r.data.metrics[key] for g in groups if g.data.tags["vlframe.variant"] == "coca"
                   for r in client.search_runs([experiment.experiment_id],
                                               f"tags.`mlflow.parentRunId` = '{g.info.run_id}'")]
    assert float(rows["coca"][key]) == pytest.approx(sum(coca_values) / len(coca_values))
    assert float(rows["coca"][f"{key} ci95_low"]) <= float(rows["coca"][key]) <= float(rows["coca"][f"{key} ci95_high"])
    p = rows["wide_temp"][f"{key} p_vs_coca"]
    assert p == "" or 0.0 <= float(p) <= 1.0
    # The paired bootstrap over the 32 test images, from each seed run's saved per-item scores.
    assert "paired bootstrap over the test items" in compared.out
    boot = float(rows["wide_temp"][f"{key} pboot_vs_coca"])
    assert 0.0 < boot <= 1.0 and rows["wide_temp"][f"{key} items"] == "32"
    assert int(rows["wide_temp"]["eval/retrieval/t2i_r1 items"]) >= 2 * 32  # every caption is a query
    seed_run = next(r for g in groups if g.data.tags["vlframe.variant"] == "coca"
                    for r in client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{g.info.run_id}'"))
    saved = client.download_artifacts(seed_run.info.run_id, "eval/retrieval/items.json", str(tmp_path))
    import json

    per_item = json.loads(Path(saved).read_text())
    assert sum(per_item["i2t_r1"].values()) / 32 == pytest.approx(seed_run.data.metrics[key])
    assert (out / "comparison.png").stat().st_size > 1000
    bad = run_main("compare", str(path), "--baseline", "nope")
    assert bad.code == 2 and "--baseline nope: no such variant" in bad.err

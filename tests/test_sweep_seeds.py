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

from conftest import CONFIGS, run_main
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
    common = micro(tmp_path, **{"tracking.enabled": True, "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
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
    assert (out / "comparison.png").stat().st_size > 1000
    bad = run_main("compare", str(path), "--baseline", "nope")
    assert bad.code == 2 and "--baseline nope: no such variant" in bad.err

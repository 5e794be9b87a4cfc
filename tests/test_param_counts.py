"""Table 1 of the paper: Base, Large and the 2.1B CoCa, built on the meta device."""

from __future__ import annotations

import pytest

from registry import Registry
from vlframe import build_model, parameter_counts

from conftest import CONFIGS

# (config, image encoder, decoder, total) in parameters, from the paper's Table 1.
TABLE1 = [
    ("coca_base.yaml", 86e6, 297e6, 383e6),
    ("coca_large.yaml", 303e6, 484e6, 787e6),
    ("coca.yaml", 1.0e9, 1.1e9, 2.1e9),
]


@pytest.mark.parametrize("name, encoder, decoder, total", TABLE1, ids=[row[0] for row in TABLE1])
def test_parameter_counts_within_3_percent_of_table_1(name, encoder, decoder, total, registry: Registry) -> None:
    model = build_model(CONFIGS / name, registry=registry, device="meta")
    assert all(p.is_meta for p in model.parameters())
    counts = parameter_counts(model)
    for part, paper in (("image_encoder", encoder), ("decoder", decoder), ("total", total)):
        assert abs(counts[part] / paper - 1) <= 0.03, f"{name} {part}: {counts[part]:,} vs paper {paper:,.0f}"


def test_tied_lm_head_is_counted_once(registry: Registry) -> None:
    model = build_model(CONFIGS / "coca.yaml", registry=registry, device="meta")
    assert model.lm_head.proj.weight is model.text_decoder.token_embedding.weight
    counts = parameter_counts(model)
    assert "lm_head" not in counts  # its only weight belongs to the token embedding
    untied = parameter_counts(build_model(CONFIGS / "coca.yaml", ["model.lm_head.tied=false"],
                                          registry=registry, device="meta"))
    assert untied["total"] - counts["total"] == 64000 * 1408

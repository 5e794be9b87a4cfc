"""A plugin from outside the project, installed with pip the way a user would, selected by YAML."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml

from registry import Kind, Registry
from vlframe import build_model

from conftest import CONFIGS, ROOT, pip_install, run_cli

FIXTURE = ROOT / "tests" / "fixtures" / "extra_pooler"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the fixture package into a fresh target directory (offline, no deps)."""
    return pip_install(FIXTURE, tmp_path_factory.mktemp("extra"))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "coca_max_pooler.yaml"
    path.write_text(yaml.safe_dump({
        "extends": str(CONFIGS / "coca_tiny.yaml"),
        "model": {"caption_pooler": {"type": "max", "keep": 3}},
    }))
    return path


def test_installed_plugin_is_listed_with_its_distribution(site: Path) -> None:
    result = run_cli("plugins", "list", "--kind", "pooler", env={"PYTHONPATH": str(site)})
    assert result.code == 0, result.err
    rows = [line.split() for line in result.out.splitlines()[1:]]
    assert ["pooler", "max", "extra_pooler", "vlf-extra-pooler", "1.0.0"] == rows[2][:5]
    assert [row[1] for row in rows] == ["attentional", "cls", "max", "mean", "none"]


def test_yaml_selects_the_external_pooler(site: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli("config", "validate", str(config_file), env={"PYTHONPATH": str(site)})
    assert (result.code, result.out.strip()) == (0, f"ok: {config_file}")
    # Without the package, the same file names the missing component.
    result = run_cli("config", "validate", str(config_file))
    assert result.code == 2
    assert "model.caption_pooler.type: unknown pooler 'max'" in result.err

    monkeypatch.syspath_prepend(str(site))
    registry = Registry.discover()
    entry = registry.catalog.get(Kind.POOLER, "max")
    assert entry.distribution == f"vlf-extra-pooler {metadata.version('vlf-extra-pooler')}"
    model = build_model(config_file, registry=registry)
    assert type(model.caption_pooler).__module__ == "vlf_extra_pooler"
    images, text = torch.randn(2, 3, 128, 128), torch.randint(1, 8192, (2, 8))
    out = model(images, text)
    assert model.caption_pooler(model.image_encoder(images)).shape == (2, 3, 256)
    out.loss.backward()
    assert model.caption_pooler.proj.weight.grad.abs().sum() > 0

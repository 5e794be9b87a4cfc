"""The ``vlframe`` command: outputs, one-line errors, exit codes (in a real process where loading matters)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from registry import Registry

from conftest import CONFIGS, run_cli, run_main


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_configs_give_one_line_per_problem_and_exit_2(tmp_path: Path) -> None:
    tiny = str(CONFIGS / "coca_tiny.yaml")
    files = {
        "unknown_type": write(tmp_path / "unknown_type.yaml", {"extends": tiny, "model": {"image_encoder": {"type": "vitt"}}}),
        "misspelled": write(tmp_path / "misspelled.yaml", {"extends": tiny, "model": {"text_decoder": {"layrs": 3}}}),
        "wrong_type": write(tmp_path / "wrong_type.yaml", {"extends": tiny, "model": {"embed_dim": "wide"}}),
        "missing_extends": write(tmp_path / "missing_extends.yaml", {"extends": "nowhere.yaml"}),
        "cycle_a": write(tmp_path / "cycle_a.yaml", {"extends": "cycle_b.yaml"}),
    }
    write(tmp_path / "cycle_b.yaml", {"extends": "cycle_a.yaml"})
    result = run_cli("config", "validate", *map(str, files.values()), str(CONFIGS / "coca_tiny.yaml"))
    assert result.code == 2
    assert "Traceback" not in result.err
    assert result.out.strip() == f"ok: {tiny}"
    f = {name: str(path) for name, path in files.items()}
    expected = [
        f"error: {f['unknown_type']}: model.image_encoder.type: unknown image encoder 'vitt' (did you mean 'vit'?); "
        "registered: timm [encoders.timm], vit [encoders.vit]",
        f"error: {f['misspelled']}: model.text_decoder.layrs: unknown field (did you mean 'layers'?); "
        "allowed: activation, embedding, heads, layers, mlp_dim, norm_eps, padding_mask, type, width",
        f"error: {f['wrong_type']}: model.embed_dim: Input should be a valid integer, "
        "unable to parse string as an integer (got 'wide')",
        f"error: {f['missing_extends']}: extends: file not found: {tmp_path / 'nowhere.yaml'}",
    ]
    lines = result.err.splitlines()
    assert lines[:4] == expected
    assert lines[4].startswith(f"error: {tmp_path / 'cycle_b.yaml'}: extends: cycle: ")
    assert len(lines) == 5


def test_unknown_plugin_in_set_is_a_one_line_error() -> None:
    result = run_main("config", "validate", str(CONFIGS / "coca_tiny.yaml"), "--set", "model.contrastive_pooler.type=attentionl")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.splitlines() == [
        f"error: {CONFIGS / 'coca_tiny.yaml'}: model.contrastive_pooler.type: unknown pooler 'attentionl' "
        "(did you mean 'attentional'?); registered: attentional [poolers], cls [poolers], mean [poolers], none [poolers]"
    ]


def test_validate_also_catches_what_only_fails_at_build_time() -> None:
    result = run_main("config", "validate", str(CONFIGS / "coca_tiny.yaml"), "--set", "model.caption_pooler.heads=3")
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.splitlines() == [
        f"error: {CONFIGS / 'coca_tiny.yaml'}: model.caption_pooler (pooler 'attentional' [poolers]): "
        "heads=3 does not divide width 256"
    ]


def test_config_show_prints_the_resolved_config() -> None:
    result = run_main("config", "show", str(CONFIGS / "coca_large.yaml"), "--set", "model.text_decoder.layers=3")
    assert result.code == 0, result.err
    shown = yaml.safe_load(result.out)
    model = shown["model"]
    assert model["image_encoder"]["width"] == 1024 and model["image_encoder"]["patch_size"] == 18  # inherited
    assert model["text_decoder"]["layers"] == 3  # overridden
    assert model["text_decoder"]["norm_eps"] == 1e-05  # a default, made explicit
    assert shown["plugins"] == {"autoload": True, "block": [], "enable": [], "override": {}}
    again = run_main("config", "show", str(CONFIGS / "coca_large.yaml"), "--format", "json")
    assert json.loads(again.out)["model"]["text_decoder"]["layers"] == 12


def test_config_schema_and_plugins_list(tmp_path: Path, registry: Registry) -> None:
    out = tmp_path / "schema.json"
    assert run_main("config", "schema", "-o", str(out)).code == 0
    schema = json.loads(out.read_text())
    names = {key for key in schema["$defs"] if "." in key}
    assert names == {f"{e.kind.value}.{e.spec.name}" for e in registry.catalog.entries()}
    listed = run_main("plugins", "list")
    assert listed.code == 0
    rows = [line.split()[:4] for line in listed.out.splitlines()[1:]]
    assert len(rows) == len(registry.catalog.entries())
    assert ["image_encoder", "vit", "encoders.vit", "vlframe"] in rows
    assert ["model", "coca", "models.coca", "vlframe"] in rows


def test_plugin_failures_are_one_line_errors(tmp_path: Path) -> None:
    result = run_cli("plugins", "list", env={"VLFRAME_DISABLE_PLUGIN_AUTOLOAD": "1", "VLFRAME_PLUGINS": "poolerz"})
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.startswith("error: no plugin entry point named 'poolerz' in group 'vlframe'; available: ")
    blocked = run_cli("plugins", "list", env={"VLFRAME_BLOCK_PLUGINS": "poolers"})
    assert blocked.code == 0 and " attentional " not in blocked.out and " vit " in blocked.out


def test_model_summary() -> None:
    summary = run_main("model", "summary", str(CONFIGS / "coca_base.yaml"))
    assert summary.code == 0, summary.err
    counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in summary.out.splitlines()}
    assert abs(counts["total"] / 383e6 - 1) < 0.03

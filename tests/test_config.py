"""Config files: YAML composition (extends, overrides), validation against plugins, schema."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from registry import ConfigError, Kind, Registry
from vlframe import load_config
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.config.schema import config_schema

from conftest import CONFIGS

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))  # sweep files, not configs
ALL_CONFIGS = sorted(set(CONFIGS.rglob("*.yaml")) - set(SWEEPS))


def write(path: Path, data: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def tiny_child(tmp_path: Path, model: dict, name: str = "child.yaml") -> Path:
    return write(tmp_path / name, {"extends": str(CONFIGS / "coca_tiny.yaml"), "model": model})


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return [f"{p.path}: {p.message}" for p in excinfo.value.problems]


SHARED_DATA = CONFIGS.parent.parent / "shared" / "data"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path: Path, registry: Registry) -> None:
    if "../shared/data" in path.read_text() and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, which is not beside this checkout")
    config = load_config(path, registry=registry)
    assert config.model.type == "coca"


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_variant_of_every_shipped_sweep_validates(path: Path) -> None:
    from vlframe.sweeps.sweep import build_variants, load_sweep

    sweep = load_sweep(path)
    if "../shared/data" in sweep.base.read_text() and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name}'s base {sweep.base.name} reads ../shared/data, which is not beside this checkout")
    variants, _ = build_variants(sweep, path)
    assert variants and [v.error for v in variants] == [None] * len(variants)
    assert len({v.hash for v in variants}) == len(variants)  # every variant trains something else


def test_merge_replaces_a_block_whose_type_changes_and_null_removes() -> None:
    base = {"model": {"pooler": {"type": "attentional", "n_query": 8, "heads": 2}, "x": 1, "y": 2}}
    child = {"model": {"pooler": {"type": "mean"}, "x": None, "y": 3}}
    assert configfile.merge(base, child) == {"model": {"pooler": {"type": "mean"}, "y": 3}}
    same = {"model": {"pooler": {"type": "attentional", "n_query": 4}}}
    assert configfile.merge(base, same)["model"]["pooler"] == {"type": "attentional", "n_query": 4, "heads": 2}


def test_extends_chains_relative_to_each_file(tmp_path: Path) -> None:
    write(tmp_path / "a" / "grand.yaml", {"model": {"p": {"type": "t", "k": 1, "j": 1}}, "description": "g"})
    write(tmp_path / "a" / "parent.yaml", {"extends": "grand.yaml", "model": {"p": {"k": 2}}})
    child = write(tmp_path / "child.yaml", {"extends": "a/parent.yaml", "model": {"p": {"j": 3}}})
    assert configfile.compose(child) == {"model": {"p": {"type": "t", "k": 2, "j": 3}}, "description": "g"}


def test_extends_cycle_is_detected(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"extends": "b.yaml"})
    write(tmp_path / "b.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError) as err:
        configfile.compose(tmp_path / "a.yaml")
    (line,) = err.value.lines()
    assert line.startswith(f"{tmp_path / 'b.yaml'}: extends: cycle: ")
    assert line.endswith(f"{tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}")


def test_missing_extends_file_names_both_files(tmp_path: Path) -> None:
    child = write(tmp_path / "c.yaml", {"extends": "nope.yaml"})
    with pytest.raises(ConfigError) as err:
        configfile.compose(child)
    assert err.value.lines() == [f"{child}: extends: file not found: {tmp_path / 'nope.yaml'}"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "model:\n  type: coca\n  width: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        configfile.compose(bad)
    (line,) = err.value.lines()
    assert line.startswith(f"{bad}:4:") and "invalid YAML" in line


def test_overrides_parse_yaml_values_and_replace_blocks_on_type_change() -> None:
    data = {"model": {"pool": {"type": "attentional", "n_query": 64, "heads": 4}, "k": 1}}
    out = configfile.apply_overrides(data, ["model.pool.type=mean", "model.k=2.5", "model.new.deep=[1, 2]"])
    assert out == {"model": {"pool": {"type": "mean"}, "k": 2.5, "new": {"deep": [1, 2]}}}
    assert data["model"]["pool"]["n_query"] == 64  # the input is not modified
    out = configfile.apply_overrides(data, {"model.pool": {"type": "attentional", "n_query": 1}})
    assert out["model"]["pool"] == {"type": "attentional", "n_query": 1, "heads": 4}
    with pytest.raises(ConfigError, match="cannot go inside model.k: it is a int"):
        configfile.apply_overrides(data, ["model.k.x=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        configfile.apply_overrides(data, ["model.k"])


def test_dump_and_validate_round_trip_keeps_plugin_fields(registry: Registry) -> None:
    config = load_config(CONFIGS / "coca_tiny.yaml", registry=registry)
    dumped = configfile.dump(config)
    assert dumped["model"]["image_encoder"]["patch_size"] == 16  # a field of the plugin's class
    assert dumped["model"]["objectives"]["contrastive"]["init_temperature"] == 0.07
    again = registry.validate(VlframeConfig, dumped)
    assert again == config
    assert configfile.dump(again) == dumped


def test_unknown_type_suggests_and_lists_registered(tmp_path: Path, registry: Registry) -> None:
    path = tiny_child(tmp_path, {"image_encoder": {"type": "vitt"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, registry=registry)
    assert problems(err) == [
        "model.image_encoder.type: unknown image encoder 'vitt' (did you mean 'vit'?); "
        "registered: timm [encoders.timm], vit [encoders.vit]"
    ]
    assert err.value.problems[0].file == str(path)


def test_misspelled_field_suggests_the_field(tmp_path: Path, registry: Registry) -> None:
    path = tiny_child(tmp_path, {"text_decoder": {"layrs": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(path, registry=registry)
    (line,) = problems(err)
    assert line.startswith("model.text_decoder.layrs: unknown field (did you mean 'layers'?); allowed: ")
    assert "embedding" in line and "width" in line


def test_every_problem_gets_its_own_line(tmp_path: Path, registry: Registry) -> None:
    path = tiny_child(tmp_path, {
        "text_decoder": {"layers": "two"},
        "caption_pooler": {"n_query": -1},
        "objectives": {"caption": {"weigth": 1}},
        "pooler_arrangement": "diagonal",
    })
    with pytest.raises(ConfigError) as err:
        load_config(path, registry=registry)
    lines = problems(err)
    assert len(lines) == 4, lines
    assert "model.text_decoder.layers: Input should be a valid integer, unable to parse string as an integer (got 'two')" in lines
    assert "model.caption_pooler.n_query: Input should be greater than 0 (got -1)" in lines
    assert any(line.startswith("model.objectives.caption.weigth: unknown field (did you mean 'weight'?)") for line in lines)
    assert any(line.startswith("model.pooler_arrangement: Input should be 'cascade' or 'parallel'") for line in lines)


def test_wiring_problems_point_at_the_part(tmp_path: Path, registry: Registry) -> None:
    path = tiny_child(tmp_path, {"contrastive_pooler": None, "image_projection": None})
    with pytest.raises(ConfigError) as err:
        load_config(path, registry=registry)
    assert problems(err) == [
        "model.objectives.contrastive: needs image_embeds, which this model does not produce "
        "(set contrastive_pooler and image_projection)",
        "model.text_projection: contrastive_pooler, image_projection and text_projection go together",
    ]


def test_summary_queries_leave_queries_for_the_decoder(registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "coca_tiny.yaml", ["model.caption_pooler.summary_queries=64"], registry=registry)
    assert "leaves none of the 64 queries for the decoder" in " ".join(problems(err))


def test_unknown_type_in_override(registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "coca_tiny.yaml", ["model.caption_pooler.type=maxx"], registry=registry)
    (line,) = problems(err)
    assert line.startswith("model.caption_pooler.type: unknown pooler 'maxx'; registered: attentional [poolers]")


def test_config_key_blocks_plugins(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {
        "extends": str(CONFIGS / "coca_tiny.yaml"),
        "plugins": {"block": ["encoders.timm"]},
        "model": {"image_encoder": {"type": "timm", "model_name": "test_vit"}},
    })
    with pytest.raises(ConfigError) as err:
        load_config(path)
    # The error says the component exists but is blocked, and by which setting.
    assert problems(err) == [
        "model.image_encoder.type: unknown image encoder 'timm'; it is provided by plugin 'encoders.timm', "
        f"which is blocked by plugins.block in {path}; registered: vit [encoders.vit]"
    ]
    # The same file validates once the plugin is no longer blocked.
    assert load_config(path, ["plugins.block=[]"]).model.image_encoder.type == "timm"


def test_schema_covers_every_registered_component(registry: Registry) -> None:
    schema = config_schema(registry.catalog)
    defs = schema["$defs"]
    for entry in registry.catalog.entries():
        key = f"{entry.kind.value}.{entry.spec.name}"
        assert defs[key]["properties"]["type"] == {"const": entry.spec.name, "description": "Registered component name."}
        assert entry.plugin in defs[key]["description"]
    model_refs = [ref.get("$ref") for ref in schema["properties"]["model"]["anyOf"]]
    assert model_refs == ["#/$defs/model.coca", None]
    coca = defs["model.coca"]["properties"]
    pooler_refs = [r.get("$ref") for r in coca["caption_pooler"]["anyOf"][0]["anyOf"]]
    assert pooler_refs == [f"#/$defs/pooler.{n}" for n in registry.catalog.names(Kind.POOLER)] + [None]
    assert "x-vlframe-kind" not in str(schema)
    assert defs["image_encoder.vit"]["additionalProperties"] is False


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_files_satisfy_the_schema_an_editor_would_use(path: Path, registry: Registry) -> None:
    validator = jsonschema.Draft202012Validator(config_schema(registry.catalog))
    errors = list(validator.iter_errors(yaml.safe_load(path.read_text())))
    assert errors == [], [e.message for e in errors]


def test_schema_flags_what_validation_flags(registry: Registry) -> None:
    validator = jsonschema.Draft202012Validator(config_schema(registry.catalog))
    assert not validator.is_valid({"model": {"type": "coca", "text_decoder": {"type": "causal_text", "layrs": 2}}})
    assert not validator.is_valid({"model": {"type": "coca", "caption_pooler": {"type": "maxx"}}})
    assert not validator.is_valid({"extend": "coca_tiny.yaml"})
    assert validator.is_valid({"extends": "coca_tiny.yaml", "model": {"caption_pooler": {"heads": 2}}})


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    bad = write(tmp_path / "dup.yaml", "model:\n  type: coca\n  embed_dim: 8\n  embed_dim: 16\n")
    with pytest.raises(ConfigError) as err:
        configfile.compose(bad)
    assert err.value.lines() == [f"{bad}:4:3: invalid YAML: duplicate key 'embed_dim'"]


def test_top_level_and_plugin_section_typos_get_suggestions(tmp_path: Path, registry: Registry) -> None:
    path = write(tmp_path / "typo.yaml", {"extend": "coca_tiny.yaml", "model": {"type": "coca"}})
    with pytest.raises(ConfigError) as err:
        load_config(path, registry=registry)
    assert "extend: unknown field (did you mean 'extends'?); allowed: data, description, extends, model, plugins, tokenizer, tracking, train" in problems(err)
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "coca_tiny.yaml", ["plugins.blok=[]"])
    assert problems(err) == ["plugins.blok: unknown field (did you mean 'block'?); allowed: autoload, block, enable, override"]


def test_field_errors_point_at_the_field(registry: Registry) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "coca_tiny.yaml", ["model.text_decoder.activation=swish", "model.image_encoder.heads=3",
                                                 "model.image_encoder.patch_size=15"], registry=registry)
    assert problems(err) == [
        "model.image_encoder.heads: 3 heads do not divide width 256",
        "model.image_encoder.image_size: 128 is not a multiple of patch_size 15",
        "model.text_decoder.activation: unknown activation 'swish'; available: gelu, quick_gelu, relu",
    ]


def test_validated_parts_can_be_reassigned_without_a_catalog(registry: Registry) -> None:
    config = load_config(CONFIGS / "coca_tiny.yaml", registry=registry)
    other = load_config(CONFIGS / "coca_tiny.yaml", ["model.caption_pooler={type: none}"], registry=registry)
    config.model.caption_pooler = other.model.caption_pooler
    assert config.model.caption_pooler.type == "none"
    with pytest.raises(Exception, match="Input should be a valid integer"):
        config.model.embed_dim = "wide"

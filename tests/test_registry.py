"""The plugin manager: entry-point discovery, attribution, blocking, and its errors."""

from __future__ import annotations

import textwrap
from importlib import metadata
from pathlib import Path

import pytest

from registry import (
    ComponentConfig,
    ComponentSpec,
    DuplicateComponentError,
    Kind,
    PluginError,
    PluginLoadError,
    Registry,
    UnknownComponentError,
    hookimpl,
)

BUILTIN_PLUGINS = {
    "encoders.vit", "encoders.timm", "decoders.text", "decoders.multimodal",
    "poolers", "objectives", "heads", "models.coca",
}


def test_builtins_are_registered_through_the_entry_point_group(registry: Registry) -> None:
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="vlframe")}
    assert BUILTIN_PLUGINS <= set(eps)
    assert all(eps[name].startswith("vlframe_builtins.") for name in BUILTIN_PLUGINS)
    infos = {info.name: info for info in registry.plugins()}
    for name in BUILTIN_PLUGINS:
        assert infos[name].distribution == f"vlframe {metadata.version('vlframe')}"
        assert infos[name].module == eps[name]


def test_catalog_lists_every_built_in_component_with_its_source(registry: Registry) -> None:
    catalog = registry.catalog
    assert catalog.names(Kind.IMAGE_ENCODER) == ["timm", "vit"]
    assert catalog.names(Kind.POOLER) == ["attentional", "cls", "mean", "none"]
    assert catalog.names(Kind.OBJECTIVE) == ["captioning", "contrastive", "sigmoid"]
    assert catalog.names(Kind.MODEL) == ["coca"]
    assert {"causal_text"} <= set(catalog.names(Kind.TEXT_DECODER))
    assert catalog.get(Kind.POOLER, "mean").plugin == "poolers"


def test_registries_are_independent_objects() -> None:
    full = Registry.discover()
    blocked = Registry.discover(block=["poolers"])
    assert blocked.catalog.names(Kind.POOLER) == []
    assert full.catalog.names(Kind.POOLER) == ["attentional", "cls", "mean", "none"]


class _Cfg(ComponentConfig):
    pass


class _DuplicatePooler:
    @hookimpl
    def vlframe_poolers(self) -> list[ComponentSpec]:
        return [ComponentSpec("attentional", _Cfg, lambda cfg, **kw: None, "A clash with the built-in.")]


def test_two_plugins_with_one_name_contest_only_that_name(registry: Registry) -> None:
    reg = Registry.discover()
    reg.register(_DuplicatePooler(), name="clashing-plugin")
    # Everything else keeps working: only asking for the contested name is an error.
    assert reg.catalog.get(Kind.POOLER, "mean").plugin == "poolers"
    with pytest.raises(DuplicateComponentError) as err:
        reg.catalog.get(Kind.POOLER, "attentional")
    message = str(err.value)
    assert message.startswith(
        "pooler 'attentional' is registered twice: "
        f"by plugin 'poolers' (vlframe {metadata.version('vlframe')}) and by plugin 'clashing-plugin'; "
        "choose one with plugins.override: {pooler.attentional: PLUGIN}"
    )
    # Blocking either side resolves the clash.
    reg.block("clashing-plugin")
    assert reg.catalog.get(Kind.POOLER, "attentional").plugin == "poolers"


def test_an_override_chooses_the_replacement_explicitly() -> None:
    reg = Registry.discover(plugins=[_DuplicatePooler()], override={"pooler.attentional": "_DuplicatePooler"})
    entry = reg.catalog.get(Kind.POOLER, "attentional")
    assert (entry.plugin, entry.replaces, entry.spec.summary) == ("_DuplicatePooler", "poolers",
                                                                  "A clash with the built-in.")
    with pytest.raises(PluginError, match="plugins.override pooler.attentional: plugin 'heads' provides no pooler"):
        Registry.discover(override={"pooler.attentional": "heads"}).catalog
    with pytest.raises(PluginError, match="'poolr.attentional' is not KIND.NAME"):
        Registry.discover(override={"poolr.attentional": "heads"})


class _Misspelled:
    @hookimpl
    def vlframe_poolrs(self) -> list[ComponentSpec]:
        return []


def test_misspelled_hook_is_caught_with_a_suggestion() -> None:
    reg = Registry.discover()
    with pytest.raises(PluginError) as err:
        reg.register(_Misspelled(), name="typo-plugin")
    message = str(err.value)
    assert "plugin 'typo-plugin' implements unknown hook 'vlframe_poolrs'" in message
    assert "did you mean 'vlframe_poolers'" in message
    assert "typo-plugin" not in {info.name for info in reg.plugins()}


class _BadSpecs:
    @hookimpl
    def vlframe_heads(self) -> list:
        return [ComponentSpec("Bad Name", dict, 42, "two\nlines"),
                ComponentSpec("other", _Cfg, lambda cfg, **kw: None, "Its example names another.",
                              example={"type": "linear"})]

    @hookimpl
    def vlframe_poolers(self) -> list:
        raise RuntimeError("no poolers today")


def test_malformed_specs_are_unusable_alone_and_say_every_problem() -> None:
    reg = Registry.discover(plugins=[_BadSpecs()])
    catalog = reg.catalog  # the rest of the catalog still works
    assert catalog.get(Kind.HEAD, "linear").plugin == "heads"
    with pytest.raises(PluginError) as err:
        catalog.get(Kind.HEAD, "Bad Name")
    message = str(err.value)
    assert message.startswith("head 'Bad Name' of plugin '_BadSpecs' is unusable: hook vlframe_heads: ")
    assert "lower-case" in message and "subclass of registry.config.ComponentConfig" in message
    assert "factory is not callable" in message and "one non-empty line" in message
    with pytest.raises(PluginError, match="example's type 'linear' is not this component's name 'other'"):
        catalog.get(Kind.HEAD, "other")
    with pytest.raises(UnknownComponentError) as err:
        catalog.get(Kind.POOLER, "max")
    assert "plugin '_BadSpecs' provided no poolers: hook vlframe_poolers raised RuntimeError: no poolers today" \
        in str(err.value)
    (info,) = [i for i in reg.plugins() if i.name == "_BadSpecs"]
    assert len(info.problems) == 3 and info.provides == ()


def _write_distribution(site: Path, dist: str, module: str, body: str, ep_name: str) -> None:
    """Lay out an installed distribution the way pip does: module + dist-info with entry points."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[vlframe]\n{ep_name} = {module}\n")


def test_plugin_import_failure_names_plugin_and_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_distribution(tmp_path, "broken-dist", "broken_plugin", "import not_a_real_module_xyz\n", "broken")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginLoadError) as err:
        Registry.discover()
    message = str(err.value)
    assert "plugin 'broken' from distribution broken-dist 1.2.3 failed to import 'broken_plugin'" in message
    assert "not_a_real_module_xyz" in message
    # Blocking the broken plugin lets everything else load.
    reg = Registry.discover(block=["broken"])
    assert "vit" in reg.catalog.names(Kind.IMAGE_ENCODER)


def test_environment_disables_autoload_and_enables_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert Registry.discover().catalog.entries() == []
    monkeypatch.setenv("VLFRAME_PLUGINS", "poolers,heads")
    reg = Registry.discover()
    assert {info.name for info in reg.plugins()} == {"poolers", "heads"}
    monkeypatch.setenv("VLFRAME_PLUGINS", "poolerz")
    with pytest.raises(PluginError, match="no plugin entry point named 'poolerz'"):
        Registry.discover()


def test_environment_blocks_named_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLFRAME_BLOCK_PLUGINS", "encoders.timm, poolers")
    catalog = Registry.discover().catalog
    assert catalog.names(Kind.IMAGE_ENCODER) == ["vit"]
    assert catalog.names(Kind.POOLER) == []
    with pytest.raises(UnknownComponentError) as err:
        catalog.get(Kind.IMAGE_ENCODER, "timm")
    assert "unknown image encoder 'timm'" in str(err.value)
    assert "it is provided by plugin 'encoders.timm', which is blocked by VLFRAME_BLOCK_PLUGINS" in str(err.value)
    assert "registered: vit [encoders.vit]" in str(err.value)


def test_blocking_an_unknown_plugin_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(PluginError) as err:
        Registry.discover(block=["encoders.tim"])
    assert str(err.value).startswith("cannot block plugin 'encoders.tim': no such plugin (did you mean 'encoders.timm'?)")


def test_with_nothing_loaded_the_message_says_why() -> None:
    reg = Registry.discover(autoload=False)
    with pytest.raises(UnknownComponentError) as err:
        reg.catalog.get(Kind.MODEL, "coca")
    assert "registered: (none: no loaded plugin provides one; is plugin autoloading off?)" in str(err.value)

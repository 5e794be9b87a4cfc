"""Plugin authors' paper cuts, each as a plugin author meets it: installed distributions on
sys.path, the real command line (in this process, through ``vlframe.cli.main``, unless the process
matters), real runs."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, run_cli, run_main
from registry import ComponentSpec, Kind, Registry, hookimpl
from training_configs import TINY, micro, sets
from vlframe.config import files as configfile


def distribution(site: Path, dist: str, module: str, body: str, ep_name: str, version: str = "1.2.3") -> Path:
    """An installed distribution as pip lays it out: the module and a dist-info with its entry point."""
    site.mkdir(parents=True, exist_ok=True)
    path = site / f"{module}.py"
    path.write_text(textwrap.dedent(body))
    for old in site.glob(f"{dist.replace('-', '_')}-*.dist-info"):
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[vlframe]\n{ep_name} = {module}\n")
    return path


MAX_POOLER = """
from torch import nn
from registry import ComponentConfig, ComponentSpec, hookimpl

class Cfg(ComponentConfig):
    pass

class MaxPool(nn.Module):
    def __init__(self, cfg, *, in_dim, out_dim, num_prefix_tokens=0):
        super().__init__()
        self.out_dim, self.proj = out_dim, nn.Linear(in_dim, out_dim)

    def forward(self, tokens, mask=None):
        return self.proj(tokens).amax(dim=1, keepdim=True)

@hookimpl
def vlframe_poolers():
    return [ComponentSpec("{name}", Cfg, MaxPool, "{summary}")]
"""


def test_a_plugin_that_provides_nothing_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A plain function named like a hook, without @hookimpl: pluggy ignores it, silently, unless asked.
    distribution(tmp_path, "forgetful", "forgetful_plugin", "def vlframe_poolers():\n    return []\n", "forgetful")
    distribution(tmp_path / "other", "maxer", "listed_maxer", MAX_POOLER.format(name="maxish", summary="Max."), "maxer")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    result = run_main("plugins", "list", "--plugins")
    assert result.code == 0, result.err
    rows = {line.split()[0]: line for line in result.out.splitlines()[1:]}
    assert "forgetful 1.2.3" in rows["forgetful"]
    assert rows["forgetful"].endswith("nothing: it implements no vlframe hook (is @hookimpl missing?)")
    assert rows["maxer"].split()[1:4] == ["maxer", "1.2.3", "listed_maxer"] and rows["maxer"].endswith("pooler.maxish")
    assert "pooler.attentional, pooler.cls, pooler.mean, pooler.none" in rows["poolers"]
    blocked = run_main("plugins", "list", "--plugins", env={"VLFRAME_BLOCK_PLUGINS": "maxer"})
    assert [line for line in blocked.out.splitlines() if line.startswith("maxer")][0].endswith(
        "blocked by VLFRAME_BLOCK_PLUGINS")


def test_a_failing_factory_is_one_line_and_debug_gives_the_traceback(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    body = MAX_POOLER.format(name="boom", summary="Raises.").replace(
        "super().__init__()", "super().__init__()\n        raise KeyError('no such table')")
    distribution(tmp_path / "site", "boomer", "boomer_plugin", body, "boomer")
    env = {"PYTHONPATH": str(tmp_path / "site")}
    args = ("config", "validate", str(TINY), "--set", "model.caption_pooler={type: boom}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = run_main(*args)
    assert result.code == 2 and "Traceback" not in result.err
    assert result.err.splitlines() == [
        f"error: {TINY}: model.caption_pooler (pooler 'boom' [boomer]): the factory raised KeyError: 'no such table' "
        "(run with --debug (or VLFRAME_DEBUG=1) for the traceback)"]
    for debug in (run_cli("--debug", *args, env=env), run_main(*args, env={"VLFRAME_DEBUG": "1"})):
        assert debug.code == 2 and "Traceback" in debug.err and "boomer_plugin.py" in debug.err
        assert "KeyError: 'no such table'" in debug.err


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A distribution whose plugin cannot even be imported (a user blocks it in their config)."""
    site = tmp_path_factory.mktemp("broken")
    distribution(site, "broken-dist", "broken_plugin", "import not_a_real_module_xyz\n", "broken")
    return site


@pytest.mark.slow
def test_commands_on_a_run_honour_its_plugins_section(broken_site: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(broken_site))
    assert "failed to import" in run_main("plugins", "list").err  # broken unless blocked
    overrides = micro(tmp_path, **{"plugins.block": ["broken"], "train.steps": 2})
    trained = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides))
    assert trained.code == 0, trained.err[-2000:]
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (20, 200, 40)).save(image)
    for args in (("eval", str(tmp_path / "run"), "--task", "retrieval", "--data", "synthetic", "--limit", "8",
                  "--no-track"),
                 ("caption", str(tmp_path / "run"), str(image)),
                 ("embed", str(tmp_path / "run"), "--images", str(image), "--out", str(tmp_path / "e.safetensors"))):
        result = run_main(*args)
        assert result.code == 0, (args[0], result.err[-2000:])


def test_convert_honours_plugin_settings_given_with_set(broken_site: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("open_clip", reason="open-clip-torch is a test dependency")
    from test_open_clip_import import SMALL, _open_clip_model

    weights = tmp_path / "small.pt"
    torch.save(_open_clip_model(SMALL, 0).state_dict(), weights)
    spec = tmp_path / "small.json"
    spec.write_text(json.dumps(SMALL))
    args = ("convert", "open-clip", "--model", str(spec), "--checkpoint", str(weights), "--out", str(tmp_path / "c"))
    monkeypatch.syspath_prepend(str(broken_site))
    assert run_main(*args).code == 2
    result = run_main(*args, "--set", "plugins.block=[broken]")
    assert result.code == 0, result.err[-2000:]
    saved = configfile.read_yaml(tmp_path / "c" / "config.yaml")
    assert saved["plugins"]["block"] == ["broken"]  # and the converted folder keeps the setting


def test_a_plugin_change_enters_the_sweep_variant_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlframe.sweeps.sweep import variant_hash

    site = tmp_path / "site"
    source = distribution(site, "maxer", "maxer_plugin", MAX_POOLER.format(name="maxish", summary="Max."), "maxer")
    monkeypatch.syspath_prepend(str(site))

    def hashes() -> tuple[str, str]:
        import importlib
        import sys

        sys.modules.pop("maxer_plugin", None)
        importlib.invalidate_caches()
        registry = Registry.discover()
        uses = configfile.load(TINY, ["model.caption_pooler={type: maxish}"], registry)[0]
        plain = configfile.load(TINY, (), registry)[0]
        return variant_hash(uses, registry), variant_hash(plain, registry)

    before, plain_before = hashes()
    source.write_text(source.read_text().replace("amax", "amin"))  # a fix, same version
    fixed, plain_fixed = hashes()
    distribution(site, "maxer", "maxer_plugin", source.read_text(), "maxer", version="1.2.4")
    bumped, _ = hashes()
    assert len({before, fixed, bumped}) == 3
    assert plain_before == plain_fixed  # a variant that does not use the plugin keeps its hash


def test_two_plugins_with_one_name_and_the_override_that_settles_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    distribution(tmp_path, "meaner", "meaner_plugin", MAX_POOLER.format(name="mean", summary="My mean."), "meaner")
    monkeypatch.syspath_prepend(str(tmp_path))
    # Commands that do not use the contested name work as before.
    assert run_main("config", "validate", str(TINY)).code == 0
    using = ("config", "validate", str(TINY), "--set", "model.contrastive_pooler={type: mean}")
    result = run_main(*using)
    assert result.code == 2 and "pooler 'mean' is registered twice: by plugin '" in result.err
    assert "plugin 'meaner' (meaner 1.2.3)" in result.err and "plugin 'poolers' (vlframe 0.2.0)" in result.err
    assert "choose one with plugins.override: {pooler.mean: PLUGIN}" in result.err
    chosen = run_main(*using, "--set", "plugins.override={pooler.mean: meaner}")
    assert chosen.code == 0, chosen.err
    from vlframe import build_model

    model = build_model(TINY, ["model.contrastive_pooler={type: mean}", "plugins.override={pooler.mean: meaner}"])
    assert type(model.contrastive_pooler).__module__ == "meaner_plugin"
    env_chosen = run_main(*using, env={"VLFRAME_OVERRIDE": "pooler.mean=poolers"})
    assert env_chosen.code == 0, env_chosen.err


def test_a_part_no_objective_trains_is_caught_at_validation() -> None:
    # The multimodal decoder kept with the captioning objective removed would get no gradient: fine
    # in one process, a crash at step 2 under DDP. It is a config error now, naming each idle part.
    result = run_main("config", "validate", str(TINY), "--set", "model.objectives.caption=null")
    assert result.code == 2 and "Traceback" not in result.err
    lines = result.err.splitlines()
    assert f"error: {TINY}: model.multimodal_decoder: no objective trains it (none reads caption_states or lm_head " \
           "or logits); add an objective that does, or remove the part" in lines
    assert {line.split(": ")[2] for line in lines} == {"model.caption_pooler", "model.multimodal_decoder", "model.lm_head"}


def test_tracking_changes_nothing_in_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    def ours() -> dict[str, str]:  # MLflow keeps a private telemetry session id of its own there
        return {k: v for k, v in os.environ.items() if not k.startswith("_MLFLOW_TELEMETRY")}

    before = ours()
    from vlframe.runs import tracking

    tracker = tracking.Tracker(tmp_path / "run", uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert tracker.start(run_name="env", params={"a": "1"}) is not None
    tracker.log_metrics({"m": 1.0}, step=1)
    tracker.finish()
    assert ours() == before
    # Importing it changes nothing either (in a fresh process: this one imported it long ago).
    import subprocess
    import sys

    probe = ("import os; before = dict(os.environ); import vlframe.runs.tracking, vlframe_builtins.tracking.mlflow_sink; "
             "assert dict(os.environ) == before, set(os.environ) ^ set(before)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600).returncode == 0


@pytest.mark.slow
def test_every_command_finds_the_store_by_one_rule(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'env-store.db'}"
    overrides = micro(tmp_path, **{"tracking.enabled": True, "train.steps": 2})
    result = run_main("train", str(TINY), "--run-dir", str(tmp_path / "run"), *sets(overrides),
                      env={"MLFLOW_TRACKING_URI": uri})
    assert result.code == 0, result.err[-2000:]
    assert f"at {uri}" in result.err  # $MLFLOW_TRACKING_URI, not the embedded store of train.output_dir
    assert json.loads((tmp_path / "run" / "tracking" / "run.json").read_text())["uri"] == uri
    assert not (tmp_path / "runs" / "mlflow.db").exists()


class _Misbehaving:
    """A task that raises, a task with a non-number metric, and objectives that misbehave while
    they run (their factories are fine, so only running them shows it)."""

    @hookimpl
    def vlframe_tasks(self):
        from registry import TaskConfig

        class Crash:
            def __init__(self, cfg):
                pass

            def run(self, context):
                raise RuntimeError("task exploded")

        class Words:
            def __init__(self, cfg):
                pass

            def run(self, context):
                from vlframe.sdk import EvalResult

                return EvalResult("words", {"acc": "high"})

        class Cfg(TaskConfig):
            pass

        return [ComponentSpec("crash", Cfg, Crash, "Raises."), ComponentSpec("words", Cfg, Words, "Says words.")]

    @hookimpl
    def vlframe_objectives(self):
        from registry import ObjectiveConfig

        class Cfg(ObjectiveConfig):
            requires = frozenset({"text_embeds"})

        class Vector(torch.nn.Module):
            def __init__(self, cfg):
                super().__init__()

            def forward(self, outputs):
                return outputs["text_embeds"].sum(dim=-1)  # not reduced to a scalar

        class BadMetrics(Vector):
            def forward(self, outputs):
                return outputs["text_embeds"].sum()

            def metrics(self):
                raise KeyError("scale")

        return [ComponentSpec("vector", Cfg, Vector, "Returns a vector."),
                ComponentSpec("bad_metrics", Cfg, BadMetrics, "Its metrics() raises.")]


def test_plugin_code_failing_while_it_runs_is_one_line_naming_it(tmp_path: Path) -> None:
    from registry import ComponentError
    from vlframe import build_model
    from vlframe.evaluation.tasks import run_task, task_config
    from vlframe.inference.trained import load_trained
    from vlframe.training.trainer import Trainer

    registry = Registry.discover(plugins=[_Misbehaving()])
    config, _ = configfile.load(TINY, micro(tmp_path, **{"train.steps": 2}), registry)
    result = Trainer(config, registry, run_dir=tmp_path / "run").fit()
    trained = load_trained(result.checkpoint, registry=registry)
    with pytest.raises(ComponentError) as err:
        run_task(trained, task_config(registry.catalog, {"type": "crash"}, "test"))
    assert str(err.value) == ("task crash (crash [_Misbehaving]) failed: RuntimeError: task exploded (run with --debug "
                              "(or VLFRAME_DEBUG=1) for the traceback)")
    with pytest.raises(ComponentError, match=r"task words \(words \[_Misbehaving\]\) returned metrics that are not "
                                             r"numbers: acc"):
        run_task(trained, task_config(registry.catalog, {"type": "words"}, "test"))

    model = build_model(TINY, micro(tmp_path, **{"model.objectives.v": {"type": "vector"}}), registry=registry)
    images, text = torch.randn(2, 3, 64, 64), torch.randint(3, 500, (2, 6))
    with pytest.raises(ComponentError, match=r"model.objectives.v \(Vector\) returned \(2,\), not a scalar loss"):
        model(images, text)
    bad = micro(tmp_path, **{"model.objectives.m": {"type": "bad_metrics"}, "train.steps": 1})
    config, _ = configfile.load(TINY, bad, registry)
    with pytest.raises(ComponentError, match=r"model.objectives.m \(BadMetrics\): metrics\(\) failed: KeyError: 'scale'"):
        Trainer(config, registry, run_dir=tmp_path / "bad").fit()

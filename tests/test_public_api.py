"""The public API: ``registry`` and ``vlframe.sdk`` are what plugins import. A name that moved keeps
working where it was, warns once saying where it went, and CHANGELOG.md says how to migrate."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from conftest import CONFIGS, ROOT, clean_env


def test_every_public_name_resolves() -> None:
    import registry
    import vlframe.sdk as sdk

    assert [name for name in registry.__all__ if getattr(registry, name, None) is None] == []
    assert [name for name in sdk.__all__ if getattr(sdk, name, None) is None] == []


def test_every_moved_module_still_imports_warns_once_and_is_in_the_changelog() -> None:
    """In a fresh process, as a plugin written against an earlier version would run."""
    from vlframe.lazy import MOVED_MODULES

    code = ("import warnings, importlib, sys\n"
            "warnings.simplefilter('always')\n"
            "from vlframe.lazy import MOVED_MODULES\n"
            "for old, new in MOVED_MODULES.items():\n"
            "    with warnings.catch_warnings(record=True) as caught:\n"
            "        module = importlib.import_module(old)\n"
            "        again = importlib.import_module(old)\n"
            "    assert module is again is importlib.import_module(new), old\n"
            "    messages = [str(w.message) for w in caught if w.category is FutureWarning]\n"
            "    assert messages == [f'{old} moved to {new}; a plugin imports these names from vlframe.sdk "
            "(see CHANGELOG.md)'], (old, messages)\n"
            "from vlframe.distributed import gather_with_grad\n"
            "import vlframe.sdk\n"
            "assert gather_with_grad is vlframe.sdk.gather_with_grad\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                          timeout=600)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert [old for old, new in MOVED_MODULES.items() if f"`{old}`" not in changelog or f"`{new}`" not in changelog] == []


def test_a_name_moved_out_of_a_module_that_became_a_package_warns_and_resolves() -> None:
    import vlframe.sdk as sdk

    module = importlib.import_module("vlframe.evaluation")
    module.__dict__.pop("EvalResult", None)  # as in a fresh process
    with pytest.warns(FutureWarning, match=r"vlframe\.evaluation\.EvalResult moved: import EvalResult from vlframe\.sdk"):
        moved = module.EvalResult
    assert moved is sdk.EvalResult
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert module.EvalResult is moved  # once
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        module.nothing  # noqa: B018


def test_a_strategys_settings_beside_its_name_are_read_into_its_block(caplog: pytest.LogCaptureFixture) -> None:
    """Configs of the previous version: ``train: {parallel: fsdp, fsdp: {...}}``."""
    from vlframe.config import files as configfile

    config, _ = configfile.load(CONFIGS / "coca_tiny.yaml", ["train.parallel=fsdp", "train.fsdp={replicate: 2}"])
    assert "train.fsdp: the parallel strategy's settings now go in its block" in caplog.text
    assert config.train.parallel.type == "fsdp" and config.train.parallel.replicate == 2
    new, _ = configfile.load(CONFIGS / "coca_tiny.yaml", ["train.parallel={type: fsdp, replicate: 2}"])
    assert new.train.parallel == config.train.parallel
    dotted, _ = configfile.load(CONFIGS / "coca_tiny.yaml", ["train.parallel=fsdp", "train.parallel.replicate=2"])
    assert dotted.train.parallel == config.train.parallel  # a named component takes its settings by --set too
    default, _ = configfile.load(CONFIGS / "coca_tiny.yaml")
    assert default.train.parallel.type == "ddp"  # the registry's default strategy, written out


def test_a_resolved_config_of_the_previous_version_loads(caplog: pytest.LogCaptureFixture) -> None:
    """Every checkpoint of 0.1 holds ``parallel: ddp`` with the ``fsdp`` block of its defaults beside it:
    it loads without a word; a block of another strategy with settings of its own is ignored, saying so."""
    from vlframe.config import files as configfile

    old = configfile.compose(CONFIGS / "coca_tiny.yaml")
    old["train"] = {**old.get("train", {}), "parallel": "ddp", "fsdp": {
        "reshard_after_forward": True, "replicate": 1, "param_dtype": "auto", "cpu_offload": False}}
    config, _ = configfile.load(old)
    assert config.train.parallel.type == "ddp" and caplog.text == ""
    old["train"]["fsdp"]["replicate"] = 4
    config, _ = configfile.load(old)
    assert config.train.parallel.type == "ddp"
    assert "train.fsdp: settings of the parallel strategy 'fsdp', which this config does not use" in caplog.text


def test_functions_that_moved_into_the_contract_warn_and_still_answer() -> None:
    from registry import CapabilityError
    from vlframe.evaluation import tasks
    from vlframe_builtins.tasks.zeroshot import ZeroShotTaskConfig

    with pytest.warns(FutureWarning, match=r"tasks\.why_not moved: call registry\.protocols\.why_not"):
        assert tasks.why_not(ZeroShotTaskConfig(type="zeroshot"), {"captioning"}) == "no contrastive capability"
    with pytest.warns(FutureWarning, match=r"tasks\.require moved: call registry\.require_capabilities"):
        with pytest.raises(CapabilityError, match="needs the contrastive capability"):
            tasks.require(object(), {"contrastive"}, "this")


def test_a_moved_module_keeps_its_own_spec() -> None:
    code = ("import importlib, warnings\nwarnings.simplefilter('ignore')\nimport vlframe.distributed\n"
            "import vlframe.runtime.distributed as new\nassert new.__spec__.name == 'vlframe.runtime.distributed'\n"
            "importlib.reload(new)\nprint('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(), cwd=ROOT,
                          timeout=600)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]

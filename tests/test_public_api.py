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


def test_a_strategys_settings_beside_its_name_are_read_into_its_block() -> None:
    """Configs of the previous version: ``train: {parallel: fsdp, fsdp: {...}}``."""
    from vlframe.config import files as configfile

    with pytest.warns(FutureWarning, match=r"train\.fsdp: the parallel strategy's settings now go in its block"):
        config, _ = configfile.load(CONFIGS / "coca_tiny.yaml", ["train.parallel=fsdp", "train.fsdp={replicate: 2}"])
    assert config.train.parallel.type == "fsdp" and config.train.parallel.replicate == 2
    new, _ = configfile.load(CONFIGS / "coca_tiny.yaml", ["train.parallel={type: fsdp, replicate: 2}"])
    assert new.train.parallel == config.train.parallel
    default, _ = configfile.load(CONFIGS / "coca_tiny.yaml")
    assert default.train.parallel.type == "ddp"  # the registry's default strategy, written out

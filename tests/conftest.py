"""Shared fixtures: the real registry (from installed entry points) and a CLI runner."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry import Registry
from vlframe.runtime.compiling import key_caches_by_isa

try:
    from mlflow_server import servers  # noqa: F401 - a fixture shared by the tracking tests
except ImportError:  # a GPU machine without MLflow runs the kernel tests only (scripts/gpu_check.sh)
    pass

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tests call torch.compile directly too: their cached graphs are keyed by the CPU's vector ISA, as
# vlframe's own are (vlframe.runtime.compiling), so a suite run held to AVX2 never loads AVX-512 code.
key_caches_by_isa()


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.discover(autoload=True)


@pytest.fixture(scope="session", autouse=True)
def _no_stray_artifacts() -> None:
    """Tests keep their MLflow stores in tmp folders: nothing may land in the checkout's ./mlruns."""
    before = (ROOT / "mlruns").exists()
    yield
    assert before or not (ROOT / "mlruns").exists(), "a test wrote MLflow artifacts to ./mlruns"


@pytest.fixture(autouse=True)
def _clean_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from default plugin loading and the default MLflow store, whatever the caller's
    environment says (VLFRAME_PRECISION alone is honoured)."""
    for name in ("VLFRAME_DISABLE_PLUGIN_AUTOLOAD", "VLFRAME_BLOCK_PLUGINS", "VLFRAME_PLUGINS", "VLFRAME_OVERRIDE",
                 "VLFRAME_DEBUG", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


#: Environment variables the suite passes on to the processes it starts (the rest of VLFRAME_* is
#: plugin loading, which each test sets itself): VLFRAME_PRECISION=fp32 runs everything in float32.
PASSED_ON = ("VLFRAME_PRECISION",)


def clean_env(*drop: str) -> dict[str, str]:
    """This process's environment without vlframe's plugin settings (and without ``drop`` prefixes)."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith(("VLFRAME_", "MLFLOW_TRACKING_URI", *drop)) and k not in PASSED_ON)}


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: float = 1800) -> CliResult:
    """Run the installed ``vlframe`` command in a fresh process. ``timeout`` is a hang guard only,
    far above any expected time (the suite runs on slow and loaded machines too)."""
    full_env = clean_env()
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("vlframe")
    proc = subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def run_main(*args: str, env: dict[str, str] | None = None) -> CliResult:
    """The same ``vlframe`` command in this process (``vlframe.cli.main``): its exit code and what it
    printed, without the second or two a new process spends importing torch. For commands whose
    process boundary does not matter (``run_cli`` where it does: signals, plugins on PYTHONPATH)."""
    import contextlib
    import io

    from vlframe.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


_STORE_TEMPLATE: list[Path] = []


def new_store(db: Path) -> str:
    """The URI of an empty MLflow store at ``db``, copied from one that vlframe's own code made
    once this session. Making a store runs MLflow's schema migrations, seconds in every process
    that finds the store missing; tests about something else start from the copy. (What store
    creation does, races and repairs included, is tested on stores made from nothing.)"""
    if not _STORE_TEMPLATE:
        import atexit
        import tempfile

        from vlframe_builtins.tracking import mlflow_store as store

        folder = Path(tempfile.mkdtemp(prefix="vlframe-store-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        store.prepare_sqlite(folder / "mlflow.db")
        _STORE_TEMPLATE.append(folder / "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], db)
    return f"sqlite:///{db}"


def pip_install(package: Path, work: Path) -> Path:
    """pip-install a fixture package the way a user would (offline, no deps) into a fresh folder
    under ``work``; returns the folder, to put on PYTHONPATH."""
    source = shutil.copytree(package, work / "src" / package.name)
    target = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return target

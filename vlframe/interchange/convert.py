"""Import another framework's checkpoint through an importer plugin.

``import_checkpoint`` returns the converted model in memory, ready to caption, embed or evaluate;
``convert_checkpoint`` writes it as a vlframe checkpoint folder (config.yaml, model.safetensors,
tokenizer.model, a state at step 0) that ``vlframe eval``, ``vlframe caption``,
:func:`vlframe.inference.trained.load_trained` and ``train.init_from`` (fine-tuning) all accept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from registry import Kind, Registry, VlframeError
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig
from vlframe.runs import checkpoint


class ConversionError(VlframeError):
    """A checkpoint that does not fit the architecture it was converted as."""


def _some(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _importer(name: str, registry: Registry) -> Any:
    catalog = registry.catalog
    spec = catalog.get(Kind.IMPORTER, name).spec
    return catalog.build(Kind.IMPORTER, spec.config(type=name), path=f"importer {name}")


def import_checkpoint(
    importer: str,
    architecture: str | Path,
    checkpoint_file: str | Path,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    registry: Registry | None = None,
) -> tuple[nn.Module, VlframeConfig, dict[str, Any]]:
    """The converted model (eval mode, CPU), its validated config, and where it came from.

    ``overrides`` (``"a.b=value"``) adjust the importer's config, e.g. ``tokenizer.path`` or
    ``model.attention_backend``; the architecture itself is the checkpoint's. Plugin settings
    among them (``plugins.block=[...]``) hold from the start, for the importer too. Raises
    :class:`ConversionError` naming the file when its keys or shapes do not fit.
    """
    model, config, source, _ = _import(importer, architecture, checkpoint_file, overrides, registry)
    return model, config, source


def _import(importer: str, architecture: str | Path, checkpoint_file: str | Path,
            overrides: Iterable[str] | Mapping[str, Any], registry: Registry | None):
    from vlframe.api import build_model

    registry = registry or configfile.registry_for(configfile.apply_overrides({}, overrides), "--set")
    imp = _importer(importer, registry)
    try:
        data = imp.config(architecture)
    except ValueError as exc:
        raise ConversionError(f"--model {architecture}: {exc}") from None
    config, registry = configfile.load(configfile.apply_overrides(data, overrides), registry=registry)
    model = build_model(config, registry=registry)
    try:
        weights = imp.convert(imp.read(Path(checkpoint_file)), architecture)
    except ValueError as exc:  # the importer's word; named after the file unless it names it itself
        text = str(exc)
        raise ConversionError(text if text.startswith(str(checkpoint_file)) else f"{checkpoint_file}: {text}") from None
    expected = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
                for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra or problems:
        raise ConversionError(
            f"{checkpoint_file}: the {importer} importer's output does not fit the {architecture} model: "
            + "; ".join(filter(None, [f"shapes differ ({_some(problems)})" if problems else "",
                                      f"not produced: {_some(missing)}" if missing else "",
                                      f"not in the model: {_some(extra)}" if extra else ""])))
    model.load_state_dict(weights, strict=True)
    source = {"importer": importer, "architecture": str(architecture), "checkpoint": str(Path(checkpoint_file).resolve())}
    return model.eval(), config, source, registry


def convert_checkpoint(
    importer: str,
    architecture: str | Path,
    checkpoint_file: str | Path,
    out: str | Path,
    *,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    registry: Registry | None = None,
) -> Path:
    """Convert ``checkpoint_file`` and write the vlframe checkpoint folder ``out``; return it.

    The folder is written beside ``out`` first and renamed into place, so a failed conversion
    leaves nothing that looks like a checkpoint. An existing ``out`` is refused unless it is an
    earlier conversion (then it is replaced).
    """
    import tempfile

    from vlframe.api import build_tokenizer

    out = Path(out)
    if out.exists() and not _is_conversion(out):
        raise ConversionError(f"--out {out}: exists and is not an earlier conversion; choose a new folder")
    model, config, source, registry = _import(importer, architecture, checkpoint_file, overrides, registry)
    tokenizer = build_tokenizer(config, registry)
    if not tokenizer.trained:
        raise ConversionError(f"the {importer} importer's tokenizer ({config.tokenizer.type}) needs training first")
    plugins = registry.fingerprint(configfile.used_plugins(config, registry.catalog))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        state = {"step": 0, "converted_from": source, "config_hash": configfile.run_hash(config, registry),
                 "plugins": plugins}
        files = {checkpoint.CONFIG: configfile.to_yaml(config), checkpoint.TOKENIZER: tokenizer.save(Path(tmp))}
        return checkpoint.write(out, model, state, files)


def _is_conversion(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`convert_checkpoint` (so replacing it loses nothing)."""
    try:  # read_state never runs anything a folder someone else made holds
        state = checkpoint.read_state(folder)
    except checkpoint.CheckpointError:  # unreadable or absent: not ours to replace
        return False
    return isinstance(state, dict) and "converted_from" in state


def export_checkpoint(source: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write checkpoint ``source`` (sharded or not; a run folder: its newest) as a folder with one
    ``model.safetensors``, its config, tokenizer and a state at its step; return (out, source).

    The whole model is assembled in this process (no process group), so exporting needs the
    memory of the weights once; ``out`` must not exist yet.
    """
    from vlframe.inference.trained import load_trained

    out = Path(out)
    if out.exists():
        raise ConversionError(f"--out {out}: exists; choose a new folder")
    ckpt, passed = checkpoint.find_readable(Path(source))
    if ckpt is None:
        why = "; ".join(passed) or "no checkpoint there"
        raise ConversionError(f"{source}: {why}")
    trained = load_trained(ckpt)
    state = checkpoint.read_state(ckpt)
    keep = {k: state[k] for k in ("step", "run_id", "config_hash", "plugins") if k in state}
    files = {checkpoint.CONFIG: ckpt / checkpoint.CONFIG, checkpoint.TOKENIZER: ckpt / checkpoint.TOKENIZER}
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write(out, trained.model, {**keep, "exported_from": str(ckpt.resolve())}, files)
    return out, ckpt

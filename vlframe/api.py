"""The Python entry points: load a config, build a model and its tokenizer, count parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from registry import ConfigError, Kind, Problem, Registry
from vlframe.config import files as configfile
from vlframe.config.root import VlframeConfig

ConfigSource = str | Path | Mapping[str, Any] | VlframeConfig


def load_config(
    source: str | Path | Mapping[str, Any],
    overrides: Iterable[str] | Mapping[str, Any] = (),
    registry: Registry | None = None,
) -> VlframeConfig:
    """Read a YAML file (or a mapping), resolve ``extends`` and overrides, and validate it.

    ``overrides`` are ``"a.b.c=value"`` strings or a ``{"a.b.c": value}`` mapping. Raises
    :class:`registry.ConfigError` listing every problem with its dotted path.
    """
    config, _ = configfile.load(source, overrides, registry)
    return config


def build_tokenizer(config: VlframeConfig, registry: Registry, path: Path | None = None) -> Any:
    """The config's tokenizer (an untrained one has ``trained`` false).

    ``path`` names a trained tokenizer file to load instead of the one the config names, e.g.
    the one saved in a checkpoint.
    """
    if config.tokenizer is None:
        raise ConfigError([Problem("tokenizer", "required: choose a tokenizer "
                                   f"({registry.catalog.describe(Kind.TOKENIZER)})")])
    tok_cfg = config.tokenizer
    if path is not None:
        tok_cfg = tok_cfg.model_copy(update={"path": path})
    return registry.catalog.build(Kind.TOKENIZER, tok_cfg, path="tokenizer", vocab_size=config.model.vocab_size)


def build_model(
    config_or_path: ConfigSource,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build the model a config describes: the one path every command builds models through.

    ``config_or_path`` is a YAML path, a mapping, or a validated :class:`VlframeConfig`.
    ``device="meta"`` builds without allocating memory (for parameter counts of large models).
    The model follows :class:`registry.protocols.Model`: its ``forward`` returns a
    :class:`vlframe.nn.ModelOutput` with the losses by objective name and their weighted total,
    and it has the members of each capability it declares (``encode_image``, ...).
    """
    if isinstance(config_or_path, VlframeConfig):
        config = config_or_path
        if overrides:
            data = configfile.apply_overrides(configfile.dump(config), overrides)
            config, registry = configfile.load(data, registry=registry)
        registry = registry or configfile.registry_for(configfile.dump(config))
    else:
        config, registry = configfile.load(config_or_path, overrides, registry)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return registry.catalog.build(Kind.MODEL, config.model, path="model", catalog=registry.catalog)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level component, plus the model's ``summary_groups()`` and ``total``.

    A tied weight is counted once, under the component that registered it first.
    """
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():  # shared parameters appear once
        part = name.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + param.numel()
    groups = getattr(model, "summary_groups", None)
    for group, parts in (groups() if callable(groups) else {}).items():
        counts[group] = sum(counts.get(part, 0) for part in parts)
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts

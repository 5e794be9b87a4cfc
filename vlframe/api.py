"""The Python entry points: load a config, build a model from it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from registry import Kind, Registry
from vlframe import configfile
from vlframe.config import VlframeConfig

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
    """The config's tokenizer (default: SentencePiece trained on the training captions).

    ``path`` names a trained tokenizer file to load instead of the one the config names, e.g.
    the one saved in a checkpoint. An untrained tokenizer has ``trained`` false.
    """
    catalog = registry.catalog
    tok_cfg = config.tokenizer or catalog.get(Kind.TOKENIZER, "sentencepiece").spec.config(type="sentencepiece")
    if path is not None:
        tok_cfg = tok_cfg.model_copy(update={"path": path})
    return catalog.build(Kind.TOKENIZER, tok_cfg, path="tokenizer", vocab_size=config.model.vocab_size)


def build_model(
    config_or_path: ConfigSource,
    overrides: Iterable[str] | Mapping[str, Any] = (),
    *,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build the model a config describes.

    ``config_or_path`` is a YAML path, a mapping, or a validated :class:`VlframeConfig`.
    ``device="meta"`` builds without allocating memory (for parameter counts of large models).
    The returned module has ``encode_image``, ``encode_text`` and a ``forward`` that returns a
    :class:`vlframe.nn.ModelOutput` with the losses by objective name and their weighted total.
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

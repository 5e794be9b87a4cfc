"""The Python entry points: load a config, build a model and its tokenizer, count parameters."""

from __future__ import annotations

import contextlib
import os
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


#: Above this a parameter count is a typo in a size, not a model: refused before anything is built.
MAX_PARAMETERS = 10**12
#: Bytes per parameter that training holds at least: float32 weights and gradients, and the
#: optimiser's state (AdamW: two moments; Adafactor: factored, about nothing).
TRAINING_BYTES_PER_PARAMETER = {"adamw": 16, "adafactor": 8}


def check_size(config: VlframeConfig, registry: Registry, *, training: bool = False, device: torch.device | None = None,
               shards: int = 1) -> int:
    """Build the model on the meta device (no memory) and refuse it, as a config problem, when
    its parameter count is absurd, or (``training``) when its weights, gradients and optimiser
    state alone (``shards``: split over that many ranks) exceed the memory of ``device``.
    Returns the parameter count."""
    model = build_model(config, registry=registry, device="meta")
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise ConfigError([Problem("model", f"{count / 1e9:,.0f}B parameters ({count * 4 / 2**40:,.1f} TiB of float32 "
                                            f"weights): more than any model vlframe builds ({MAX_PARAMETERS / 1e9:.0f}B); "
                                            "check its sizes (width, layers, vocab_size)")])
    if training:
        per = TRAINING_BYTES_PER_PARAMETER.get(config.train.optimizer, 16)
        need, have = count * per / shards, memory_of(device or torch.device("cpu"))
        if have and need > have:
            raise ConfigError([Problem("model", f"{count / 1e6:,.0f}M parameters need {need / 2**30:,.1f} GiB to train "
                                                f"(float32 weights, gradients and {config.train.optimizer} state, before "
                                                f"any activation), more than the {have / 2**30:,.1f} GiB of this "
                                                f"{'GPU' if (device and device.type == 'cuda') else 'machine'}; make the "
                                                "model smaller")])
    return count


def memory_of(device: torch.device) -> int | None:
    """Bytes of memory ``device`` has: a GPU's, or this machine's (its cgroup limit where lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            total = min(total, int(Path(limit).read_text().strip()))
    return total

"""The component catalog: every spec the registered plugins returned, by kind and name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from registry.config import CONTEXT_KEY, ComponentConfig
from registry.errors import (
    BuildError,
    DuplicateComponentError,
    UnknownComponentError,
    VlframeError,
    did_you_mean,
)
from registry.kinds import Kind
from registry.specs import ComponentSpec

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Entry:
    """A spec together with the plugin (and distribution) that provided it."""

    kind: Kind
    spec: ComponentSpec
    plugin: str
    distribution: str | None = None

    @property
    def source(self) -> str:
        """``plugin 'name' (distribution version)``, for messages."""
        dist = f" ({self.distribution})" if self.distribution else ""
        return f"plugin '{self.plugin}'{dist}"


class Catalog:
    """Immutable lookup of components by ``(kind, name)``. Built by :class:`registry.Registry`."""

    def __init__(self, entries: Iterable[Entry]):
        self._by_kind: dict[Kind, dict[str, Entry]] = {kind: {} for kind in Kind}
        for entry in entries:
            known = self._by_kind[entry.kind]
            if entry.spec.name in known:
                first = known[entry.spec.name]
                raise DuplicateComponentError(
                    f"{entry.kind.label} '{entry.spec.name}' is registered twice: "
                    f"by {first.source} and by {entry.source}; "
                    "block one of them (VLFRAME_BLOCK_PLUGINS or the config's plugins.block)"
                )
            known[entry.spec.name] = entry

    def names(self, kind: Kind) -> list[str]:
        return sorted(self._by_kind[kind])

    def entries(self, kind: Kind | None = None) -> list[Entry]:
        kinds = [kind] if kind is not None else list(Kind)
        return [self._by_kind[k][n] for k in kinds for n in sorted(self._by_kind[k])]

    def describe(self, kind: Kind) -> str:
        """``vit [encoders.vit], timm [encoders.timm]``: what is registered, for messages."""
        entries = self.entries(kind)
        if not entries:
            return "(none: no loaded plugin provides one; is plugin autoloading off?)"
        return ", ".join(f"{e.spec.name} [{e.plugin}]" for e in entries)

    def get(self, kind: Kind, name: str) -> Entry:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {kind.label} '{name}'{did_you_mean(name, self.names(kind))}; "
                f"registered: {self.describe(kind)}"
            ) from None

    def validate(self, model: type[M], data: Any) -> M:
        """Validate ``data`` against ``model``, dispatching every component slot through this catalog.

        Raises pydantic's ``ValidationError``; :func:`vlframe.configfile` turns it into lines.
        """
        return model.model_validate(data, context={CONTEXT_KEY: self})

    def build(self, kind: Kind, config: ComponentConfig, *, path: str = "", **kwargs: Any) -> Any:
        """Build the component ``config`` selects, passing the kind's keyword arguments.

        ``path`` (e.g. ``model.caption_pooler``) is named in the :class:`BuildError` raised when
        the factory fails: factories raise ``ValueError`` for settings that only conflict once
        the surrounding model is known (say, a head count that does not divide the width).
        """
        entry = self.get(kind, config.type)
        if not isinstance(config, entry.spec.config):
            raise BuildError(
                f"{path or kind.label}: config is a {type(config).__name__}, but "
                f"{kind.label} '{config.type}' expects {entry.spec.config.__name__}"
            )
        try:
            return entry.spec.factory(config, **kwargs)
        except (VlframeError, ValidationError):
            raise
        except Exception as exc:
            where = f"{path or kind.label} ({kind.label} '{config.type}' [{entry.plugin}])"
            # A ValueError is the factory's own word on the config; anything else is named as is.
            detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            raise BuildError(f"{where}: {detail}") from exc

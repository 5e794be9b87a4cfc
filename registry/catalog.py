"""The component catalog: every spec the registered plugins returned, by kind and name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from registry.config import CONTEXT_KEY, ComponentConfig
from registry.errors import (  # noqa: F401 - ENV_DEBUG, DEBUG_HINT, debugging, one_line: re-exported
    DEBUG_HINT,
    ENV_DEBUG,
    BuildError,
    DuplicateComponentError,
    PluginError,
    UnknownComponentError,
    VlframeError,
    debugging,
    did_you_mean,
    one_line,
)
from registry.kinds import Kind
from registry.protocols import conformance_problems
from registry.specs import ComponentSpec

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Entry:
    """A spec together with the plugin (and distribution) that provided it."""

    kind: Kind
    spec: ComponentSpec
    plugin: str
    distribution: str | None = None
    #: The plugin whose same-named component this one replaces (``plugins.override``).
    replaces: str | None = None

    @property
    def source(self) -> str:
        """``plugin 'name' (distribution version)``, for messages."""
        dist = f" ({self.distribution})" if self.distribution else ""
        return f"plugin '{self.plugin}'{dist}"

    @property
    def key(self) -> str:
        """``pooler.attentional``: how settings such as ``plugins.override`` name a component."""
        return f"{self.kind.value}.{self.spec.name}"


@dataclass(frozen=True)
class Broken:
    """What a plugin offered and could not: a malformed spec (``name`` given) or a whole hook that
    failed (``name`` None). Only what it concerns is unavailable; asking for it says why."""

    kind: Kind
    name: str | None
    plugin: str
    message: str


def parse_key(key: str) -> tuple[Kind, str]:
    """``"pooler.attentional"`` -> ``(Kind.POOLER, "attentional")``; a ValueError names the kinds."""
    kind, sep, name = key.partition(".")
    kinds = [k.value for k in Kind]
    if not sep or not name or kind not in kinds:
        raise ValueError(f"'{key}' is not KIND.NAME with KIND one of {', '.join(kinds)}")
    return Kind(kind), name


class Catalog:
    """Immutable lookup of components by ``(kind, name)``. Built by :class:`registry.Registry`.

    Two plugins registering one name do not break the catalog: the name is *contested*, and only
    asking for it is an error (naming both, and how to choose), unless ``override`` names the
    plugin that wins (``{"pooler.attentional": "my_plugin"}``).
    """

    def __init__(self, entries: Iterable[Entry], *, override: Mapping[str, str] | None = None,
                 explain_missing: Callable[[Kind, str], str] | None = None, broken: Iterable[Broken] = (),
                 explain_kind: Callable[[Kind], str] | None = None):
        self._by_kind: dict[Kind, dict[str, Entry]] = {kind: {} for kind in Kind}
        self._contested: dict[tuple[Kind, str], list[Entry]] = {}
        self._explain = explain_missing
        self._explain_kind = explain_kind
        self.broken: list[Broken] = list(broken)
        candidates: dict[tuple[Kind, str], list[Entry]] = {}
        for entry in entries:
            candidates.setdefault((entry.kind, entry.spec.name), []).append(entry)
        wanted = dict(override or {})
        for key, plugin in wanted.items():
            kind, name = parse_key(key)
            offered = candidates.get((kind, name), [])
            if not any(e.plugin == plugin for e in offered):
                by = ", ".join(e.plugin for e in offered) or "no plugin"
                raise PluginError(f"plugins.override {key}: plugin '{plugin}' provides no {kind.label} "
                                  f"'{name}' (provided by: {by})")
        for (kind, name), offered in candidates.items():
            chosen = wanted.get(f"{kind.value}.{name}")
            if chosen is not None:
                winner = next(e for e in offered if e.plugin == chosen)
                others = [e.plugin for e in offered if e is not winner]
                self._by_kind[kind][name] = Entry(kind, winner.spec, winner.plugin, winner.distribution,
                                                  replaces=", ".join(others) or None)
            elif len(offered) == 1:
                self._by_kind[kind][name] = offered[0]
            else:
                self._contested[(kind, name)] = offered

    def names(self, kind: Kind) -> list[str]:
        return sorted({*self._by_kind[kind], *(n for k, n in self._contested if k is kind)})

    def entries(self, kind: Kind | None = None) -> list[Entry]:
        """Every usable entry (a contested name is left out until an override settles it)."""
        kinds = [kind] if kind is not None else list(Kind)
        return [self._by_kind[k][n] for k in kinds for n in sorted(self._by_kind[k])]

    def contested(self) -> dict[tuple[Kind, str], list[Entry]]:
        return dict(self._contested)

    def describe(self, kind: Kind) -> str:
        """``vit [encoders.vit], timm [encoders.timm]``: what is registered, for messages."""
        parts = [f"{e.spec.name} [{e.plugin}]" for e in self.entries(kind)]
        parts += [f"{n} [{' and '.join(e.plugin for e in es)}: contested]"
                  for (k, n), es in sorted(self._contested.items(), key=lambda item: item[0][1]) if k is kind]
        if not parts:
            return "(none: no loaded plugin provides one; is plugin autoloading off?)"
        return ", ".join(sorted(parts))

    def unknown_message(self, kind: Kind, name: str) -> str:
        """Why ``name`` is not available, with a suggestion and what is registered."""
        extra = self._explain(kind, name) if self._explain is not None else ""
        failed = [b for b in self.broken if b.kind is kind and b.name is None]
        if failed and not extra:
            extra = "; ".join(f"plugin '{b.plugin}' provided no {kind.label}s: {b.message}" for b in failed)
        return (f"unknown {kind.label} '{name}'{did_you_mean(name, self.names(kind))}"
                f"{'; ' + extra if extra else ''}; registered: {self.describe(kind)}")

    def contested_message(self, kind: Kind, name: str) -> str:
        offered = self._contested[(kind, name)]
        first, second = offered[0], offered[1]
        return (f"{kind.label} '{name}' is registered twice: by {first.source} and by {second.source}; "
                f"choose one with plugins.override: {{{kind.value}.{name}: PLUGIN}} (or VLFRAME_OVERRIDE), "
                "or block one (VLFRAME_BLOCK_PLUGINS or the config's plugins.block)")

    def not_loaded(self, kind: Kind) -> str:
        """Why a plugin that would provide a ``kind`` is not loaded (blocked, or autoloading off);
        empty when none is left out."""
        return self._explain_kind(kind) if self._explain_kind is not None else ""

    def default(self, kind: Kind) -> Entry | None:
        """The component of ``kind`` whose config class says ``default = True`` (the parallel
        strategy of a config that names none, the tracking sink of runs that configure no URI);
        None when no plugin offers one. Two defaults are an error naming both."""
        found = [e for e in self.entries(kind) if getattr(e.spec.config, "default", False) is True]
        if len(found) > 1:
            raise DuplicateComponentError(
                f"{len(found)} {kind.label}s declare themselves the default: "
                f"{', '.join(f'{e.spec.name} [{e.plugin}]' for e in found)}; name one in the config, or block a plugin")
        return found[0] if found else None

    def get(self, kind: Kind, name: str) -> Entry:
        try:
            return self._by_kind[kind][name]
        except KeyError:
            if (kind, name) in self._contested:
                raise DuplicateComponentError(self.contested_message(kind, name)) from None
            for broken in self.broken:
                if broken.kind is kind and broken.name == name:
                    raise PluginError(f"{kind.label} '{name}' of plugin '{broken.plugin}' is unusable: "
                                      f"{broken.message}") from None
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def validate(self, model: type[M], data: Any) -> M:
        """Validate ``data`` against ``model``, dispatching every component slot through this catalog.

        Raises pydantic's ``ValidationError``; :func:`vlframe.config.files` turns it into lines.
        """
        return model.model_validate(data, context={CONTEXT_KEY: self})

    def build(self, kind: Kind, config: ComponentConfig, *, path: str = "", **kwargs: Any) -> Any:
        """Build the component ``config`` selects, passing the kind's keyword arguments, and check
        that what the factory returned follows the kind's protocol (:mod:`registry.protocols`).

        ``path`` (e.g. ``model.caption_pooler``) is named in the :class:`BuildError` raised when
        the factory fails or returns something that does not conform: factories raise
        ``ValueError`` for settings that only conflict once the surrounding model is known (say,
        a head count that does not divide the width). Any other exception is reported on one
        line too; its traceback is kept as the error's cause (``--debug`` prints it).
        """
        entry = self.get(kind, config.type)
        where = f"{path or kind.label} ({kind.label} '{config.type}' [{entry.plugin}])"
        if not isinstance(config, entry.spec.config):
            raise BuildError(
                f"{path or kind.label}: config is a {type(config).__name__}, but "
                f"{kind.label} '{config.type}' expects {entry.spec.config.__name__}"
            )
        try:
            built = entry.spec.factory(config, **kwargs)
        except (VlframeError, ValidationError):
            raise
        except ValueError as exc:  # the factory's own word on the config
            raise BuildError(f"{where}: {exc}") from exc
        except Exception as exc:
            raise BuildError(f"{where}: the factory raised {one_line(exc)}") from exc
        problems = conformance_problems(kind, built)
        if problems:
            raise BuildError(f"{where}: the built {kind.label} {'; '.join(problems)}")
        return built

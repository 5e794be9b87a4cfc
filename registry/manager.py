"""The plugin manager: discovers plugins through one entry-point group and builds the catalog.

A registry is an object; nothing here keeps module-level state, so two registries (say, one
with a plugin blocked) can live side by side, and tests build their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, TypeVar

import pluggy
from pydantic import BaseModel

from registry import hookspecs
from registry.catalog import Catalog, Entry
from registry.config import KIND_CONFIG_BASE
from registry.errors import PluginError, PluginLoadError, did_you_mean
from registry.kinds import Kind
from registry.specs import ComponentSpec

#: The one entry-point group plugins register in; vlframe's built-ins use it too.
ENTRY_POINT_GROUP = "vlframe"
#: Set to 1/true/yes to stop loading plugins from entry points.
ENV_DISABLE_AUTOLOAD = "VLFRAME_DISABLE_PLUGIN_AUTOLOAD"
#: Comma-separated plugin (entry point) names never to load.
ENV_BLOCK = "VLFRAME_BLOCK_PLUGINS"
#: Comma-separated entry point names to load even when autoloading is off.
ENV_ENABLE = "VLFRAME_PLUGINS"

M = TypeVar("M", bound=BaseModel)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin: its name, the distribution that installed it, and its module."""

    name: str
    distribution: str | None
    module: str


class Registry:
    """Plugins and the components they provide.

    Typical use::

        registry = Registry.discover()            # load every entry point in group "vlframe"
        catalog = registry.catalog                # specs by (kind, name)
        config = registry.validate(VlframeConfig, data)
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._distributions: dict[str, str | None] = {}
        self._catalog: Catalog | None = None

    # -- discovery -------------------------------------------------------------------------

    @classmethod
    def discover(
        cls,
        *,
        autoload: bool | None = None,
        block: Iterable[str] = (),
        enable: Iterable[str] = (),
        plugins: Sequence[Any] = (),
    ) -> Registry:
        """A registry loaded from entry points, honouring the environment and the arguments.

        ``autoload`` defaults to on unless ``VLFRAME_DISABLE_PLUGIN_AUTOLOAD`` is set; ``block``
        adds to ``VLFRAME_BLOCK_PLUGINS``; with autoloading off only the entry points named in
        ``enable`` or ``VLFRAME_PLUGINS`` load. ``plugins`` are objects registered directly.
        """
        registry = cls()
        blocked = [*_env_list(ENV_BLOCK), *block]
        for name in blocked:
            registry.block(name)
        if autoload is None:
            autoload = not _env_flag(ENV_DISABLE_AUTOLOAD)
        only = None if autoload else {*_env_list(ENV_ENABLE), *enable}
        known = registry.load_entry_points(only=only)
        for plugin in plugins:
            known.add(registry.register(plugin))
        for name in blocked:  # a misspelled block would silently block nothing
            if name not in known:
                raise PluginError(
                    f"cannot block plugin '{name}': no such plugin{did_you_mean(name, known)}; "
                    f"plugins: {', '.join(sorted(known)) or '(none)'}"
                )
        return registry

    def load_entry_points(self, *, only: set[str] | None = None) -> set[str]:
        """Import and register the plugins of the entry-point group (all, or those in ``only``).

        Returns the names of every entry point in the group, loaded or not.

        Loaded in our own loop, not pluggy's ``load_setuptools_entrypoints``, so that an import
        failure names the entry point and its distribution.
        """
        seen: dict[str, str] = {}
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = _distribution_label(ep)
            if ep.name in seen:
                if seen[ep.name] != ep.value:  # same name, two different plugins
                    raise PluginError(
                        f"plugin name '{ep.name}' is claimed by two entry points: "
                        f"'{seen[ep.name]}' and '{ep.value}' ({dist})"
                    )
                continue  # one distribution visible twice on sys.path
            seen[ep.name] = ep.value
            if only is not None and ep.name not in only:
                continue
            if self._pm.is_blocked(ep.name) or self._pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                raise PluginLoadError(
                    f"plugin '{ep.name}' from distribution {dist or '(unknown)'} failed to import "
                    f"'{ep.value}': {type(exc).__name__}: {exc}"
                ) from exc
            self.register(plugin, name=ep.name, distribution=dist)
        if only:
            missing = sorted(set(only) - set(seen))
            if missing:
                raise PluginError(
                    f"no plugin entry point named {', '.join(repr(m) for m in missing)} "
                    f"in group '{ENTRY_POINT_GROUP}'; available: {', '.join(sorted(seen)) or '(none)'}"
                )
        return set(seen)

    # -- registration ----------------------------------------------------------------------

    def register(self, plugin: Any, name: str | None = None, distribution: str | None = None) -> str:
        """Register ``plugin`` (a module or object with ``@hookimpl`` functions); return its name.

        A hook implementation whose name matches no hook (a misspelling) is an error here,
        through pluggy's ``check_pending``, rather than a silently ignored function.
        """
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if self._pm.is_blocked(name):
            return name
        try:
            self._pm.register(plugin, name=name)
        except ValueError as exc:  # pluggy: name or object already registered
            raise PluginError(f"plugin '{name}' cannot be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{name}': {exc}") from exc
        self._distributions[name] = distribution
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError:
            message = self._pending_message(plugin, name)
            self._pm.unregister(name=name)
            self._distributions.pop(name, None)
            raise PluginError(message) from None
        self._catalog = None
        return name

    def block(self, name: str) -> None:
        """Block the plugin ``name``: unregister it if present and never register it again."""
        self._pm.set_blocked(name)
        self._distributions.pop(name, None)
        self._catalog = None

    def plugins(self) -> list[PluginInfo]:
        """The registered plugins, sorted by name."""
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:
                continue
            module = getattr(plugin, "__name__", type(plugin).__module__)
            infos.append(PluginInfo(name, self._distributions.get(name), module))
        return sorted(infos, key=lambda info: info.name)

    def _pending_message(self, plugin: Any, name: str) -> str:
        known = [kind.hook for kind in Kind]
        bad = [c.name for c in self._pm.get_hookcallers(plugin) or [] if not c.has_spec()]
        parts = [f"'{hook}'{did_you_mean(hook, known)}" for hook in sorted(bad)]
        return (
            f"plugin '{name}' implements unknown hook {', '.join(parts)}; "
            f"vlframe hooks: {', '.join(known)}"
        )

    # -- the catalog -----------------------------------------------------------------------

    @property
    def catalog(self) -> Catalog:
        """Every registered component, collected from the hooks on first use and then cached."""
        if self._catalog is None:
            self._catalog = Catalog(self._collect())
        return self._catalog

    def validate(self, model: type[M], data: Any) -> M:
        """Validate ``data`` against ``model`` with component slots resolved by this registry."""
        return self.catalog.validate(model, data)

    def _collect(self) -> list[Entry]:
        entries = []
        for kind in Kind:
            caller = getattr(self._pm.hook, kind.hook)
            # Call each implementation ourselves so every spec is attributed to its plugin.
            for impl in caller.get_hookimpls():  # in registration order
                plugin = impl.plugin_name
                where = f"plugin '{plugin}', hook {kind.hook}"
                try:
                    specs = impl.function()
                except Exception as exc:
                    raise PluginError(f"{where} raised {type(exc).__name__}: {exc}") from exc
                if specs is None:
                    continue
                if not isinstance(specs, (list, tuple)):
                    raise PluginError(f"{where} must return a list of ComponentSpec, got {type(specs).__name__}")
                for spec in specs:
                    if not isinstance(spec, ComponentSpec):
                        raise PluginError(f"{where} returned {spec!r}, not a ComponentSpec")
                    problems = spec.problems(KIND_CONFIG_BASE[kind])
                    if problems:
                        raise PluginError(f"{where}, {kind.label} {spec.name!r}: {'; '.join(problems)}")
                    entries.append(Entry(kind, spec, plugin, self._distributions.get(plugin)))
        return entries


def _distribution_label(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"

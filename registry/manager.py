"""The plugin manager: discovers plugins through one entry-point group and builds the catalog.

A registry is an object; nothing here keeps module-level state, so two registries (say, one
with a plugin blocked) can live side by side, and tests build their own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pluggy
from pydantic import BaseModel

from registry import hookspecs
from registry.catalog import Broken, Catalog, Entry, parse_key
from registry.config import KIND_CONFIG_BASE
from registry.errors import PluginError, PluginLoadError, did_you_mean, one_line
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
#: Comma-separated ``KIND.NAME=PLUGIN``: which plugin's component wins where two register one name.
ENV_OVERRIDE = "VLFRAME_OVERRIDE"

M = TypeVar("M", bound=BaseModel)


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_override() -> dict[str, str]:
    out = {}
    for item in _env_list(ENV_OVERRIDE):
        key, sep, plugin = item.partition("=")
        if not sep or not plugin.strip():
            raise PluginError(f"{ENV_OVERRIDE}: expected KIND.NAME=PLUGIN, got '{item}'")
        out[key.strip()] = plugin.strip()
    return out


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin: its name, the distribution that installed it, its module, and the
    components it provides (``pooler.attentional``, ...; empty when it provides nothing)."""

    name: str
    distribution: str | None
    module: str
    provides: tuple[str, ...] = field(default=())
    hooks: tuple[str, ...] = field(default=())
    #: What it offered and could not (malformed specs, hooks that raised), one line each.
    problems: tuple[str, ...] = field(default=())


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
        #: Plugins left out, and the setting that left each out (for messages).
        self._blocked: dict[str, str] = {}
        self._not_enabled: dict[str, metadata.EntryPoint] = {}
        self._entry_points: dict[str, metadata.EntryPoint] = {}
        self._override: dict[str, str] = {}
        self._autoload_reason = "autoload=False"

    # -- discovery -------------------------------------------------------------------------

    @classmethod
    def discover(
        cls,
        *,
        autoload: bool | None = None,
        block: Iterable[str] = (),
        enable: Iterable[str] = (),
        plugins: Sequence[Any] = (),
        override: Mapping[str, str] | None = None,
        source: str | None = None,
    ) -> Registry:
        """A registry loaded from entry points, honouring the environment and the arguments.

        ``autoload`` defaults to on unless ``VLFRAME_DISABLE_PLUGIN_AUTOLOAD`` is set; ``block``
        adds to ``VLFRAME_BLOCK_PLUGINS``; with autoloading off only the entry points named in
        ``enable`` or ``VLFRAME_PLUGINS`` load. ``plugins`` are objects registered directly.
        ``override`` (with ``VLFRAME_OVERRIDE``) maps ``KIND.NAME`` to the plugin whose
        component of that name wins over another plugin's. ``source`` names the config file the
        settings came from, for messages.
        """
        registry = cls()
        where = f" in {source}" if source else ""
        for name in _env_list(ENV_BLOCK):
            registry.block(name, reason=ENV_BLOCK)
        for name in block:
            registry.block(name, reason=f"plugins.block{where}" if source else "Registry.discover(block=...)")
        env_autoload_off = _env_flag(ENV_DISABLE_AUTOLOAD)
        if autoload is None:
            autoload = not env_autoload_off
        only = None if autoload else {*_env_list(ENV_ENABLE), *enable}
        known = registry.load_entry_points(only=only)
        for plugin in plugins:
            known.add(registry.register(plugin))
        for name in registry._blocked:  # a misspelled block would silently block nothing
            if name not in known:
                raise PluginError(
                    f"cannot block plugin '{name}': no such plugin{did_you_mean(name, known)}; "
                    f"plugins: {', '.join(sorted(known)) or '(none)'}"
                )
        wanted = {**_env_override(), **dict(override or {})}
        for key in wanted:
            try:
                parse_key(key)
            except ValueError as exc:
                raise PluginError(f"plugins.override: {exc}") from None
        registry._override = wanted
        registry._autoload_reason = (ENV_DISABLE_AUTOLOAD if env_autoload_off else
                                     f"plugins.autoload: false{where}" if source else "autoload=False")
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
            self._entry_points[ep.name] = ep
            if only is not None and ep.name not in only:
                self._not_enabled[ep.name] = ep
                continue
            if self._pm.is_blocked(ep.name) or self._pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of third-party code
                raise PluginLoadError(
                    f"plugin '{ep.name}' from distribution {dist or '(unknown)'} failed to import "
                    f"'{ep.value}': {one_line(exc, hint=False)}"
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

    def block(self, name: str, reason: str = "Registry.block()") -> None:
        """Block the plugin ``name``: unregister it if present and never register it again."""
        self._pm.set_blocked(name)
        self._blocked.setdefault(name, reason)
        self._distributions.pop(name, None)
        self._catalog = None

    def plugins(self) -> list[PluginInfo]:
        """The registered plugins, sorted by name, with what each provides."""
        provided: dict[str, list[str]] = {}
        catalog = self.catalog
        for entry in catalog.entries():
            provided.setdefault(entry.plugin, []).append(entry.key)
        for entries in catalog.contested().values():
            for entry in entries:
                provided.setdefault(entry.plugin, []).append(entry.key)
        infos = []
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None:
                continue
            module = getattr(plugin, "__name__", type(plugin).__module__)
            hooks = tuple(sorted(c.name for c in self._pm.get_hookcallers(plugin) or []))
            problems = tuple(f"{b.kind.value}{'.' + b.name if b.name else ''}: {b.message}"
                             for b in catalog.broken if b.plugin == name)
            infos.append(PluginInfo(name, self._distributions.get(name), module,
                                    tuple(sorted(provided.get(name, []))), hooks, problems))
        return sorted(infos, key=lambda info: info.name)

    def blocked(self) -> dict[str, str]:
        """Blocked plugin names and the setting that blocked each."""
        return dict(self._blocked)

    def fingerprint(self, plugins: Iterable[str] | None = None) -> dict[str, str]:
        """``{plugin: "distribution version, source sha256:..."}`` of the named (default: every)
        registered plugin: changes when a plugin is upgraded or its code is edited."""
        names = set(plugins) if plugins is not None else {p for p, _ in self._pm.list_name_plugin()}
        out = {}
        for name, plugin in self._pm.list_name_plugin():
            if plugin is None or name not in names:
                continue
            dist = self._distributions.get(name) or "unpackaged"
            out[name] = f"{dist}, source {_source_digest(plugin)}"
        return dict(sorted(out.items()))

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
            entries, broken = self._collect()
            self._catalog = Catalog(entries, override=self._override, explain_missing=self._explain, broken=broken,
                                    explain_kind=self.not_loaded)
        return self._catalog

    def validate(self, model: type[M], data: Any) -> M:
        """Validate ``data`` against ``model`` with component slots resolved by this registry."""
        return self.catalog.validate(model, data)

    def _collect(self) -> tuple[list[Entry], list[Broken]]:
        entries: list[Entry] = []
        broken: list[Broken] = []
        for kind in Kind:
            caller = getattr(self._pm.hook, kind.hook)
            # Call each implementation ourselves so every spec is attributed to its plugin.
            for impl in caller.get_hookimpls():  # in registration order
                found, bad = _specs_of(kind, impl.plugin_name, impl.function, self._distributions.get(impl.plugin_name))
                entries += found
                broken += bad
        return entries, broken

    def not_loaded(self, kind: Kind) -> str:
        """Why no loaded plugin provides a ``kind`` where a blocked or not-enabled one would
        (imported here, on this error path only, to ask it); empty when none would."""
        for plugin, reason in sorted(self._blocked.items()):
            if _provides(self._entry_points.get(plugin), kind, None):
                return f"plugin '{plugin}' provides one, and is blocked by {reason}"
        for plugin, ep in sorted(self._not_enabled.items()):
            if _provides(ep, kind, None):
                return (f"plugin '{plugin}' provides one, and is not loaded: plugin autoloading is off "
                        f"({self._autoload_reason}); add it to plugins.enable or VLFRAME_PLUGINS")
        return ""

    def _explain(self, kind: Kind, name: str) -> str:
        """Whether a plugin left out (blocked, or not enabled while autoloading is off) would provide
        ``name``: it is imported here, on this error path only, to ask it."""
        for plugin, reason in sorted(self._blocked.items()):
            if _provides(self._entry_points.get(plugin), kind, name):
                return f"it is provided by plugin '{plugin}', which is blocked by {reason}"
        for plugin, ep in sorted(self._not_enabled.items()):
            if _provides(ep, kind, name):
                return (f"it is provided by plugin '{plugin}', which is not loaded: plugin autoloading is off "
                        f"({self._autoload_reason}); add it to plugins.enable "
                        f"or VLFRAME_PLUGINS")
        return ""


def _specs_of(kind: Kind, plugin: str, function: Any, distribution: str | None) -> tuple[list[Entry], list[Broken]]:
    """The sound specs a hook returned, and what was wrong with the rest (every problem of each)."""
    hook = f"hook {kind.hook}"
    try:
        specs = function()
    except Exception as exc:
        return [], [Broken(kind, None, plugin, f"{hook} raised {one_line(exc, hint=False)}")]
    if specs is None:
        return [], []
    if not isinstance(specs, (list, tuple)):
        return [], [Broken(kind, None, plugin, f"{hook} must return a list of ComponentSpec, got {type(specs).__name__}")]
    entries, broken = [], []
    for spec in specs:
        if not isinstance(spec, ComponentSpec):
            broken.append(Broken(kind, None, plugin, f"{hook} returned {spec!r}, not a ComponentSpec"))
            continue
        problems = spec.problems(KIND_CONFIG_BASE[kind])
        if problems:
            broken.append(Broken(kind, str(spec.name), plugin, f"{hook}: {'; '.join(problems)}"))
            continue
        entries.append(Entry(kind, spec, plugin, distribution))
    return entries, broken


def _provides(ep: metadata.EntryPoint | None, kind: Kind, name: str | None) -> bool:
    """Whether the plugin of ``ep`` provides the ``kind`` named ``name`` (None: any of the kind)."""
    if ep is None:
        return False
    try:
        module = ep.load()
        hook = getattr(module, kind.hook, None)
        return hook is not None and any(name is None or getattr(s, "name", None) == name for s in hook() or [])
    except Exception:  # noqa: BLE001 - it is only asked for a message
        return False


def _source_digest(plugin: Any) -> str:
    """sha256 (first 12 hex digits) of a plugin module's source: its file, or every .py file of its package."""
    module_file = getattr(plugin, "__file__", None)
    if module_file is None:
        spec = importlib.util.find_spec(type(plugin).__module__)
        module_file = getattr(spec, "origin", None)
    if not module_file:
        return "unknown"
    path = Path(module_file)
    files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for file in files:
        try:
            digest.update(file.read_bytes())
        except OSError:
            continue
    return f"sha256:{digest.hexdigest()[:12]}"


def _distribution_label(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"

"""Reading config files: YAML, ``extends:`` inheritance, ``--set`` overrides, error lines.

Composition happens on plain data before validation:

- ``extends: other.yaml`` (or a list) inherits from files relative to this one; the child is
  deep-merged on top. When a block changes its ``type`` the whole block is replaced, since the
  old component's keys would not fit the new one. ``key: null`` removes an inherited key.
- ``--set a.b.c=value`` parses ``value`` as YAML and applies the same rules.

Validation then dispatches each component slot to its plugin's config class; every problem
becomes one line with its dotted path, e.g. ``train.lrr: unknown field (did you mean 'lr'?)``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from registry import Catalog, ConfigError, Kind, Problem, Registry, VlframeError
from registry.config import SCHEMA_KIND_KEY
from registry.errors import did_you_mean
from vlframe.config.root import PluginSettings, VlframeConfig

Data = dict[str, Any]


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Data:
    """One YAML file as a mapping; errors name the file (and line, for syntax errors)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem("", "file not found", str(path))]) from None
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read: {exc.strerror}", str(path))]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem("", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded "
                                   "(config files are UTF-8)", f"{path}:{line}:{column}")]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([Problem("", f"invalid YAML: {problem}", where)]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([Problem("", f"expected a mapping at the top level, got {type(data).__name__}", str(path))])
    return data


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Data:
    """Deep-merge ``override`` onto ``base`` (a new dict); see the module docstring for the rules."""
    result = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = result.get(key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(old, Mapping) and not _type_changes(old, value):
            result[key] = merge(old, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _type_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return "type" in new and "type" in old and new["type"] != old["type"]


def compose(path: str | Path, _chain: tuple[Path, ...] = ()) -> Data:
    """The file at ``path`` with its ``extends:`` chain resolved (cycles are errors)."""
    path = Path(path)
    chain = (*_chain, path.resolve())
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        return data
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise ConfigError([Problem("extends", "expected a file name or a list of file names", str(path))])
    base: Data = {}
    for parent in parents:
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError([Problem("extends", f"file not found: {parent_path}", str(path))])
        if parent_path.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain, parent_path.resolve()))
            raise ConfigError([Problem("extends", f"cycle: {cycle}", str(path))])
        base = merge(base, compose(parent_path, chain))
    return merge(base, data)


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str] | Mapping[str, Any]) -> Data:
    """Apply ``a.b.c=value`` strings (or a ``{"a.b.c": value}`` mapping) to ``data``."""
    items: list[tuple[str, Any]] = []
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        for text in overrides:
            key, sep, raw = text.partition("=")
            if not sep or not key.strip():
                raise ConfigError([Problem("--set", f"expected KEY=VALUE, got '{text}'")])
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as exc:
                problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise ConfigError([Problem("--set", f"{key.strip()}={raw}: the value is not valid YAML ({problem}); "
                                           "quote a string that holds YAML syntax, e.g. KEY='\"a: b\"'")]) from None
            items.append((key.strip(), value))
    result = copy.deepcopy(dict(data))
    for key, value in items:
        parts = key.split(".")
        if parts[:2] == ["plugins", "override"] and len(parts) > 3:  # its keys are KIND.NAME themselves
            parts = [*parts[:2], ".".join(parts[2:])]
        if not all(parts):
            raise ConfigError([Problem("--set", f"bad key '{key}'")])
        node = result
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, str):  # a component named alone (`parallel: fsdp`): its settings go beside its type
                child = node[part] = {"type": child}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError([Problem(key, f"--set cannot go inside {where}: it is a {type(child).__name__}")])
            node = child
        last = parts[-1]
        if last == "type" and node.get("type") not in (None, value):
            node.clear()  # a new component type: its old keys do not apply
            node["type"] = value
        else:  # same rules as a child file: merge mappings, replace on a new type, null removes
            merged = merge(node, {last: value})
            node.clear()
            node.update(merged)
    return result


def plugin_settings(data: Mapping[str, Any], source: str | None = None) -> PluginSettings:
    """The ``plugins:`` section, validated on its own (it decides which plugins exist)."""
    section = data.get("plugins") or {}
    try:
        return PluginSettings.model_validate(section)
    except ValidationError as exc:
        problems = problems_from(exc, PluginSettings, section, None, source)
        raise ConfigError([replace(p, path=f"plugins.{p.path}") for p in problems]) from None


def registry_for(data: Mapping[str, Any], source: str | None = None) -> Registry:
    """A registry discovered with the file's ``plugins:`` settings (plus the environment)."""
    settings = plugin_settings(data, source)
    return Registry.discover(
        autoload=None if settings.autoload else False, block=settings.block, enable=settings.enable,
        override=settings.override, source=source or "the config",
    )


def validate(data: Mapping[str, Any], registry: Registry, source: str | None = None) -> VlframeConfig:
    """Validate composed data into a :class:`VlframeConfig`, or raise :class:`ConfigError`."""
    catalog = registry.catalog
    try:
        return catalog.validate(VlframeConfig, dict(data))
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, VlframeConfig, data, catalog, source)) from None


def load(
    source: str | Path | Mapping[str, Any],
    overrides: Iterable[str] | Mapping[str, Any] = (),
    registry: Registry | None = None,
) -> tuple[VlframeConfig, Registry]:
    """Compose, override and validate a config; return it with the registry that validated it."""
    if isinstance(source, Mapping):
        data, name = dict(source), None
    else:
        data, name = compose(source), str(source)
    data = apply_overrides(data, overrides)
    registry = registry or registry_for(data, name)
    return validate(data, registry, name), registry


def component_block(catalog: Catalog, kind: Kind, block: Any, where: str) -> BaseModel:
    """One component block (``{type: ..., ...}``, e.g. a dataset or a task given on its own, outside
    a config file) validated against its plugin's config; problems name ``where``."""
    if not isinstance(block, Mapping) or "type" not in block:
        raise ConfigError([Problem("type", f"expected a mapping with a 'type' key naming {kind.article}", where)])
    try:
        entry = catalog.get(kind, str(block["type"]))
    except VlframeError as exc:
        raise ConfigError([Problem("type", str(exc), where)]) from None
    try:
        return catalog.validate(entry.spec.config, dict(block))
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, entry.spec.config, dict(block), catalog, where)) from None


def dump(config: BaseModel) -> Data:
    """A config as plain data (every plugin field kept), ready for YAML."""
    return config.model_dump(mode="json")


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(dump(config), sort_keys=False)


# -- error lines -----------------------------------------------------------------------------


def _dotted(loc: Iterable[Any]) -> str:
    return ".".join(str(part) for part in loc)


def problems_from(
    exc: ValidationError, root: type[BaseModel], data: Any, catalog: Catalog | None, source: str | None
) -> list[Problem]:
    """One :class:`Problem` per pydantic error, worded for a person editing YAML."""
    problems = []
    for err in exc.errors(include_url=False):
        loc, kind, msg = tuple(err["loc"]), err["type"], err["msg"]
        if kind in ("vlframe_unknown_component", "vlframe_missing_type", "vlframe_contested_component"):
            loc = (*loc, "type")
        elif kind == "extra_forbidden":
            fields = _fields_at(root, data, loc[:-1], catalog)
            if len(loc) == 1 and root is VlframeConfig:
                fields = sorted([*fields, "extends"])  # composed away before validation
            hint = did_you_mean(str(loc[-1]), fields) if fields else ""
            msg = f"unknown field{hint}" + (f"; allowed: {', '.join(fields)}" if fields else "")
        elif kind == "missing":
            msg = "required field is missing"
        elif kind.startswith("vlframe_") or kind in ("value_error", "assertion_error"):
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        else:
            got = err.get("input")
            if not isinstance(got, (dict, list)) and got is not None:
                msg = f"{msg} (got {got!r})"
        problems.append(Problem(_dotted(loc), msg, source, code=kind))
    return problems


def _fields_at(root: type[BaseModel], data: Any, loc: tuple[Any, ...], catalog: Catalog | None) -> list[str]:
    """Field names of the config model found at ``loc`` (to suggest a misspelled key's fix)."""
    current: Any = root
    node = data
    for part in loc:
        current = _concrete(current, node, catalog)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            # pydantic moves a field's own Annotated metadata (our slot marker) to .metadata
            current = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]
        else:
            return []
        node = node.get(part) if isinstance(node, Mapping) else None
    current = _concrete(current, node, catalog)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _concrete(annotation: Any, node: Any, catalog: Catalog | None) -> Any:
    """Strip ``X | None``; resolve a component slot to the config class its ``type`` selects."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    for meta in getattr(annotation, "__metadata__", ()):
        schema = getattr(meta, "json_schema", None)
        if isinstance(schema, dict) and SCHEMA_KIND_KEY in schema:
            if catalog is None or not isinstance(node, Mapping):
                return None
            try:
                return catalog.get(Kind(schema[SCHEMA_KIND_KEY]), str(node.get("type"))).spec.config
            except VlframeError:
                return None
    return getattr(annotation, "__origin__", annotation) if get_origin(annotation) is Annotated else annotation


_HOW_IT_RUNS = ("parallel", "activation_checkpointing", "recompute", "compile", "output_dir")


def config_hash(config: BaseModel, plugins: Mapping[str, str] | None = None) -> str:
    """A short hash of what a config trains: equal hashes, the same training.

    Where a run is tracked and what it is called (``tracking``, ``description``) are left out:
    they change no weight; so are the output folder, DDP or FSDP, activation checkpointing and compile (the same
    arithmetic, up to float rounding), so a run resumes under another strategy as itself. ``plugins`` (``Registry.fingerprint``: each plugin's distribution,
    version and source digest) enter it when given, so that a fixed plugin is trained again.
    """
    import hashlib
    import json

    data = {k: v for k, v in dump(config).items() if k not in ("tracking", "description")}
    if isinstance(data.get("train"), dict):  # how the step is spread and scheduled, not what it computes
        data["train"] = {k: v for k, v in data["train"].items() if k not in _HOW_IT_RUNS}
        results = _result_settings(config)
        if results:  # a strategy setting that changes what is learnt (registry.ParallelConfig)
            data["train"]["parallel_results"] = results
    if plugins:
        data["__plugins__"] = dict(plugins)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def used_plugins(config: BaseModel, catalog: Catalog, *, computing: bool = False) -> set[str]:
    """The plugins whose components a validated config selects (walking every component slot);
    ``computing``: only those of what the run computes, not of how it is spread (the parallel
    strategy), as the config hash counts them."""
    from registry import ComponentConfig, Kind

    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, BaseModel):
            if isinstance(node, ComponentConfig):
                for entry in catalog.entries():
                    if entry.spec.name == node.type and isinstance(node, entry.spec.config) and not (
                            computing and entry.kind is Kind.PARALLEL and not _result_settings(config)):
                        found.add(entry.plugin)
            for name in type(node).model_fields:
                walk(getattr(node, name))
        elif isinstance(node, Mapping):
            for value in node.values():
                walk(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                walk(value)

    walk(config)
    return found


def _result_settings(config: BaseModel) -> dict[str, Any]:
    """The parallel strategy's settings that change results, where set away from their defaults."""
    parallel = getattr(getattr(config, "train", None), "parallel", None)
    settings = getattr(parallel, "result_settings", None)
    return dict(settings()) if callable(settings) else {}


def run_hash(config: BaseModel, registry: Registry) -> str:
    """:func:`config_hash` with the fingerprint of the plugins the config computes with: the hash a
    run, a sweep variant and a converted checkpoint record."""
    return config_hash(config, registry.fingerprint(used_plugins(config, registry.catalog, computing=True)))


__all__ = ["apply_overrides", "compose", "config_hash", "dump", "load", "merge", "problems_from", "read_yaml",
           "registry_for", "run_hash", "to_yaml", "used_plugins", "validate"]

"""vlframe's plugin contract: hook specifications, plugin manager, catalog, config bases, errors.

This package depends only on pluggy and pydantic: plugins and the engine depend on it, never the
other way round.
"""

from registry.catalog import Catalog, Entry
from registry.config import (
    ComponentConfig,
    ConfigModel,
    ExistingDir,
    ExistingFile,
    ObjectiveConfig,
    component,
    raise_problems,
)
from registry.errors import (
    BuildError,
    ConfigError,
    DuplicateComponentError,
    PluginError,
    PluginLoadError,
    Problem,
    UnknownComponentError,
    VlframeError,
)
from registry.hookspecs import hookimpl
from registry.kinds import Kind
from registry.manager import (
    ENTRY_POINT_GROUP,
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    ENV_ENABLE,
    PluginInfo,
    Registry,
)
from registry.specs import ComponentSpec

__all__ = [
    "BuildError",
    "Catalog",
    "ComponentConfig",
    "ComponentSpec",
    "ConfigError",
    "ConfigModel",
    "DuplicateComponentError",
    "ENTRY_POINT_GROUP",
    "ENV_BLOCK",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_ENABLE",
    "Entry",
    "ExistingDir",
    "ExistingFile",
    "Kind",
    "ObjectiveConfig",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "Problem",
    "Registry",
    "UnknownComponentError",
    "VlframeError",
    "component",
    "hookimpl",
    "raise_problems",
]

"""vlframe's plugin contract: hook specifications, protocols, plugin manager, catalog, config bases.

This package depends only on pluggy and pydantic: plugins and the engine depend on it, never the
other way round. What each kind's factory must return is in :mod:`registry.protocols`.
"""

from registry.catalog import DEBUG_HINT, ENV_DEBUG, Catalog, Entry, debugging
from registry.config import (
    KIND_CONFIG_BASE,
    ComponentConfig,
    ConfigModel,
    DatasetConfig,
    ExistingDir,
    ExistingFile,
    ModelConfig,
    ObjectiveConfig,
    TaskConfig,
    TokenizerConfig,
    component,
    raise_problems,
)
from registry.errors import (
    BuildError,
    ComponentError,
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
    ENV_OVERRIDE,
    PluginInfo,
    Registry,
)
from registry.protocols import Capability
from registry.specs import ComponentSpec

__all__ = [
    "BuildError",
    "Capability",
    "ComponentError",
    "Catalog",
    "ComponentConfig",
    "ComponentSpec",
    "ConfigError",
    "ConfigModel",
    "DEBUG_HINT",
    "DatasetConfig",
    "DuplicateComponentError",
    "ENTRY_POINT_GROUP",
    "ENV_BLOCK",
    "ENV_DEBUG",
    "ENV_DISABLE_AUTOLOAD",
    "ENV_ENABLE",
    "ENV_OVERRIDE",
    "Entry",
    "ExistingDir",
    "ExistingFile",
    "KIND_CONFIG_BASE",
    "Kind",
    "ModelConfig",
    "ObjectiveConfig",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "Problem",
    "Registry",
    "TaskConfig",
    "TokenizerConfig",
    "UnknownComponentError",
    "VlframeError",
    "component",
    "debugging",
    "hookimpl",
    "raise_problems",
]

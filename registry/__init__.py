"""vlframe's plugin contract: hook specifications, protocols, plugin manager, catalog, config bases.

This package depends only on pluggy and pydantic: plugins and the engine depend on it, never the
other way round. What each kind's factory must return is in :mod:`registry.protocols`.
"""

from registry.catalog import Catalog, Entry
from registry.config import (
    KIND_CONFIG_BASE,
    ComponentConfig,
    ConfigModel,
    DatasetConfig,
    ExistingDir,
    ExistingFile,
    ModelConfig,
    ObjectiveConfig,
    ParallelConfig,
    TaskConfig,
    TokenizerConfig,
    TrackingSinkConfig,
    component,
    raise_problems,
)
from registry.errors import (
    DEBUG_HINT,
    ENV_DEBUG,
    BuildError,
    CapabilityError,
    ComponentError,
    ConfigError,
    DuplicateComponentError,
    PluginError,
    PluginLoadError,
    Problem,
    UnknownComponentError,
    VlframeError,
    debugging,
    in_one_line,
    one_line,
)
from registry.hookspecs import hookimpl
from registry.kinds import Kind, KindRecord
from registry.manager import (
    ENTRY_POINT_GROUP,
    ENV_BLOCK,
    ENV_DISABLE_AUTOLOAD,
    ENV_ENABLE,
    ENV_OVERRIDE,
    PluginInfo,
    Registry,
)
from registry.protocols import Capability, RunRecord, require_capabilities
from registry.specs import ComponentSpec

__all__ = [
    "BuildError",
    "Capability",
    "CapabilityError",
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
    "KindRecord",
    "ModelConfig",
    "ObjectiveConfig",
    "ParallelConfig",
    "PluginError",
    "PluginInfo",
    "PluginLoadError",
    "Problem",
    "Registry",
    "RunRecord",
    "TaskConfig",
    "TokenizerConfig",
    "TrackingSinkConfig",
    "UnknownComponentError",
    "VlframeError",
    "component",
    "debugging",
    "hookimpl",
    "in_one_line",
    "one_line",
    "raise_problems",
    "require_capabilities",
]

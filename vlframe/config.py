"""The root of a vlframe config file, and the ``plugins:`` section read before discovery."""

from __future__ import annotations

from pydantic import Field

from registry import ConfigModel, Kind, component


class PluginSettings(ConfigModel):
    """Which plugins to load. Read from the raw file before the registry exists."""

    autoload: bool = Field(True, description="Load every plugin of the 'vlframe' entry-point group.")
    block: list[str] = Field(default_factory=list, description="Plugin (entry point) names never to load.")
    enable: list[str] = Field(default_factory=list, description="Entry points to load when autoload is off.")


class VlframeConfig(ConfigModel):
    """A whole run: the model and the plugins it is assembled from."""

    description: str = Field("", description="Free text shown by `vlframe config show`.")
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    model: component(Kind.MODEL)

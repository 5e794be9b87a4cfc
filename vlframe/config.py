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


class TrackingConfig(ConfigModel):
    """Where and how a run is tracked in MLflow."""

    enabled: bool = Field(True, description="Track the run in MLflow.")
    uri: str | None = Field(
        None, description="MLflow tracking URI; default: the embedded store sqlite:///<runs dir>/mlflow.db."
    )
    experiment: str = Field("vlframe", min_length=1)
    run_name: str | None = Field(None, description="Default: the run directory's name.")
    flush_every_s: float = Field(5.0, gt=0, description="How often buffered metrics are sent.")
    timeout_s: float = Field(5.0, gt=0, description="Per-request timeout; an unreachable server never stalls training.")

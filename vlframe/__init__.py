"""vlframe: a plugin-based vision-language framework; its first model is CoCa.

    import vlframe
    model = vlframe.build_model("configs/coca_tiny.yaml", overrides=["model.embed_dim=128"])
    out = model(images, text)        # out.loss, out.losses["caption"], ...
"""

from registry import ConfigError, Registry, VlframeError
from vlframe.api import build_model, load_config
from vlframe.config import VlframeConfig
from vlframe.nn import ModelOutput, set_attention_backend
from vlframe.summary import parameter_counts

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ModelOutput",
    "Registry",
    "VlframeConfig",
    "VlframeError",
    "build_model",
    "load_config",
    "parameter_counts",
    "set_attention_backend",
]

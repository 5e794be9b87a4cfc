"""vlframe: a plugin-based vision-language framework; its first model is CoCa.

    import vlframe
    model = vlframe.build_model("configs/coca_tiny.yaml", overrides=["model.embed_dim=128"])
    out = model(images, text)        # out.loss, out.losses["caption"], ...

The names below load on first use, so that ``vlframe.nn`` (attention, kernels, blocks) imports
with torch alone, as on a GPU machine that has no pydantic or MLflow.
"""

from __future__ import annotations

from vlframe.lazy import install_moved_modules, lazy

__version__ = "0.2.0"

_EXPORTS = {
    "ConfigError": "registry",
    "Registry": "registry",
    "VlframeError": "registry",
    "build_model": "vlframe.api",
    "load_config": "vlframe.api",
    "build_tokenizer": "vlframe.api",
    "VlframeConfig": "vlframe.config.root",
    "ModelOutput": "vlframe.nn",
    "set_attention_backend": "vlframe.nn",
    "parameter_counts": "vlframe.api",
    "load_trained": "vlframe.inference.trained",
    "convert_checkpoint": "vlframe.interchange.convert",
    "import_checkpoint": "vlframe.interchange.convert",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
install_moved_modules()  # `import vlframe.distributed` (moved to vlframe.runtime) still works, and says where

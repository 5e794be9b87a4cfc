"""The root of a vlframe config file: model, tokenizer, data, training, tracking, plugins.

``model`` is any registered model builder's config (a :class:`registry.ModelConfig`), so the
engine reads ``config.model.vocab_size``, ``context_length`` and ``pad_id`` of every model alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from registry import ConfigModel, Kind, component, raise_problems
from registry.config import CONTEXT_KEY
from registry.protocols import missing_capabilities


class PluginSettings(ConfigModel):
    """Which plugins to load. Read from the raw file before the registry exists."""

    autoload: bool = Field(True, description="Load every plugin of the 'vlframe' entry-point group.")
    block: list[str] = Field(default_factory=list, description="Plugin (entry point) names never to load.")
    enable: list[str] = Field(default_factory=list, description="Entry points to load when autoload is off.")
    override: dict[str, str] = Field(
        default_factory=dict, description="KIND.NAME -> plugin: where two plugins register one name, this "
        "plugin's component is used (e.g. {pooler.attentional: my_plugin}).")


class DataConfig(ConfigModel):
    """Where images and captions come from, and how images are prepared."""

    train: component(Kind.DATASET) | None = Field(
        None, description="The training dataset (needed to train; a converted model's config has none).")
    val: component(Kind.DATASET) | None = None
    num_workers: int = Field(2, ge=0, description="Loader processes per rank (0: load in the training process).")
    max_skip_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="Stop with an error once more than this fraction of samples is unusable."
    )
    hflip: bool = Field(False, description="Random horizontal flips (leave off when captions say left/right).")
    crop_scale: tuple[float, float] | None = Field(
        None, description="Random resized crop area range, e.g. [0.8, 1.0]; none: resize and centre-crop."
    )
    interpolation: Literal["bilinear", "bicubic"] = Field(
        "bilinear", description="Resampling when resizing (open_clip's weights were trained with bicubic).")
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP's statistics
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    val_batches: int | None = Field(None, gt=0, description="Validate on this many batches; default the whole split.")
    max_image_pixels: int = Field(
        89_478_485, gt=0, description="Larger images (width x height) are unusable samples, skipped and counted "
        "like corrupt ones: a decompression bomb never reaches the decoder. Default: PIL's limit.")

    @field_validator("crop_scale")
    @classmethod
    def _an_area_range(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        # torchvision only warns on a reversed range and silently centre-crops an empty one.
        if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"{list(scale)} is not an area range: it needs 0 < low <= high <= 1, e.g. [0.8, 1.0]")
        return scale


def _defaults(catalog: Any, strategy: str) -> dict[str, Any]:
    """The default settings of a registered strategy, as a config block holds them."""
    config = catalog.validate(catalog.get(Kind.PARALLEL, strategy).spec.config, {"type": strategy})
    return {k: v for k, v in config.model_dump(mode="json").items() if k != "type"}


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A note about a config's old form, said once per process (on stderr, through logging)."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("vlframe").warning(message)


class TrainConfig(ConfigModel):
    """The optimisation: steps, batch, optimiser, schedule, precision, checkpoints."""

    steps: int = Field(1000, gt=0, description="Optimiser steps.")
    batch_size: int = Field(32, gt=0, description="Global batch per optimiser step (all ranks, all micro-batches).")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0, description="Applied to every parameter except those the model names "
                                "in no_weight_decay() (biases, norms, position embeddings, class and query tokens).")
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; none: no clipping.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware computes bf16 natively (CUDA GPUs "
        "that support it, CPUs with AVX-512 BF16 or AMX), float32 elsewhere (VLFRAME_PRECISION=fp32 or bf16 "
        "decides instead).",
    )
    seed: int = 0
    log_every: int = Field(10, gt=0)
    val_every: int | None = Field(None, gt=0, description="Validate every N steps (and at the end).")
    val_tasks: dict[str, component(Kind.TASK)] | None = Field(
        None, description="Evaluation tasks run at each validation, by name (metrics val/NAME/*); none: every "
        "registered periodic task the model can run (retrieval for a contrastive model); {}: losses only.")
    checkpoint_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Periodic checkpoints kept (the newest).")
    output_dir: Path = Field(Path("runs"), description="Run directories go here, sweeps' in sweeps/, and the default "
                             "tracking store (MLflow's embedded sqlite store).")
    init_from: Path | None = Field(
        None, description="Start from these weights (a checkpoint or run folder, e.g. from `vlframe convert`): "
        "fine-tuning. Its tokenizer is used unless tokenizer.path is set; optimiser and step start afresh.")
    parallel: component(Kind.PARALLEL) | None = Field(
        None, description="How training spreads the model over the ranks torchrun starts: a registered parallel "
        "strategy, by name or as a block with its settings (vlframe plugins list --kind parallel); none: the "
        "default strategy (replicas: DDP under torchrun, plain in one process).")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="Recompute activations in backward instead of keeping them: full: all of every "
        "block's; selective: keep each block's matmul, attention and convolution outputs, recompute the rest.")
    recompute: str | list[str] = Field(
        "auto", description="What backward recomputes instead of keeping: norm (each pre-norm's output before its "
        "projection), activation (the MLP's hidden activation), caption_logits (the captioning loss's vocabulary logits, "
        "in chunks); auto: the measured default of the precision (README, Memory and speed).")
    compile: bool = Field(False, description="torch.compile each block (then the rest runs eager); the compile "
                                             "time is reported once.")
    init_strict: bool = Field(
        True, description="false: take only the init_from weights whose name and shape fit (an ablation that drops "
        "or resizes parts of a pretrained model); the rest keep their initialisation and the run lists them.")

    @field_validator("recompute")
    @classmethod
    def _known_parts(cls, setting: str | list[str]) -> str | list[str]:
        from vlframe.nn.recompute import PARTS, resolve

        if isinstance(setting, str) and setting not in ("auto", "none", "all"):
            raise ValueError(f"'{setting}' is not a recompute choice; use auto, none, all or a list of "
                             f"{', '.join(PARTS)}")
        resolve(setting, "fp32")  # a list: its names checked
        return setting

    @field_validator("output_dir")
    @classmethod
    def _a_folder(cls, path: Path) -> Path:
        for ancestor in (path, *path.parents):  # the first part that exists must be a folder
            if ancestor.exists():
                if not ancestor.is_dir():
                    raise ValueError(f"{ancestor} is a file, not a folder" if ancestor == path else
                                     f"{path}: {ancestor} is a file, not a folder")
                break
        return path

    @model_validator(mode="before")
    @classmethod
    def _strategy_settings_inside(cls, data: Any, info: ValidationInfo) -> Any:
        """Configs of earlier versions (and every resolved config.yaml they wrote) kept a strategy's
        settings beside its name (``parallel: X`` and ``X: {...}``), and the settings of strategies
        they did not use too. The chosen one's go into its block now; another's are dropped. Read
        the old form, and say so."""
        catalog = (info.context or {}).get(CONTEXT_KEY)
        if not isinstance(data, Mapping) or catalog is None:
            return data
        strategies = set(catalog.names(Kind.PARALLEL))
        legacy = [k for k, v in data.items() if k in strategies and k not in cls.model_fields and isinstance(v, Mapping)]
        if not legacy:
            return data
        data = dict(data)
        chosen = data.get("parallel")
        name = chosen if isinstance(chosen, str) else chosen.get("type") if isinstance(chosen, Mapping) else None
        for key in legacy:
            settings = data.pop(key)
            if key == name:
                data["parallel"] = {**settings, **(chosen if isinstance(chosen, Mapping) else {}), "type": name}
                _say_once(f"train.{key}: the parallel strategy's settings now go in its block, train.parallel: "
                          f"{{type: {key}, ...}} (read this time; see CHANGELOG.md)")
            elif settings != _defaults(catalog, key):  # an earlier version's defaults: dropped unsaid
                _say_once(f"train.{key}: settings of the parallel strategy '{key}', which this config does not "
                          f"use (train.parallel: {name or 'the default'}): ignored (see CHANGELOG.md)")
        return data

    @model_validator(mode="after")
    def _check_batch(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise_problems("TrainConfig", [(("grad_accum",), f"{self.grad_accum} does not divide batch_size {self.batch_size}")])
        return self


class VlframeConfig(ConfigModel):
    """A whole run: the model, its tokenizer and data, how to train it, and where to track it."""

    description: str = Field("", description="Free text shown by `vlframe config show`.")
    plugins: PluginSettings = Field(default_factory=PluginSettings)
    model: component(Kind.MODEL)
    tokenizer: component(Kind.TOKENIZER) | None = Field(
        None, description="How texts become token ids; needed to train and to use the model.")
    data: DataConfig | None = None
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: "TrackingConfig" = Field(default_factory=lambda: TrackingConfig())

    @model_validator(mode="after")
    def _val_tasks_fit_the_model(self) -> VlframeConfig:
        """Every task named in ``train.val_tasks`` needs only capabilities the model declares."""
        have = set(self.model.capabilities()) if callable(getattr(self.model, "capabilities", None)) else set()
        problems = []
        for name, task in (self.train.val_tasks or {}).items():
            missing = missing_capabilities(getattr(type(task), "requires", ()), have)
            if missing:
                problems.append((("train", "val_tasks", name), f"task '{task.type}' needs the {', '.join(missing)} "
                                 f"capability, which this model does not have (it has: {', '.join(sorted(have)) or 'none'})"))
        raise_problems("VlframeConfig", problems)
        return self

    @model_validator(mode="after")
    def _the_default_strategy(self, info: ValidationInfo) -> VlframeConfig:
        """``train.parallel`` unset: the strategy the registry's default names, written out so that the
        resolved config says which one runs."""
        catalog = (info.context or {}).get(CONTEXT_KEY)
        if self.train.parallel is None and catalog is not None:
            entry = catalog.default(Kind.PARALLEL)
            if entry is not None:
                self.train.parallel = catalog.validate(entry.spec.config, {"type": entry.spec.name})
        return self


class TrackingConfig(ConfigModel):
    """Where and how a run is tracked (MLflow, or the tracking sink a plugin adds)."""

    enabled: bool = Field(True, description="Track the run.")
    uri: str | None = Field(
        None, description="Tracking URI; its scheme chooses the tracking sink (vlframe plugins list --kind "
        "tracking_sink). Default: the default sink's (MLflow: $MLFLOW_TRACKING_URI, else the embedded store "
        "sqlite:///<train.output_dir>/mlflow.db)."
    )
    experiment: str = Field("vlframe", min_length=1)
    run_name: str | None = Field(None, description="Default: the run directory's name.")
    flush_every_s: float = Field(5.0, gt=0, description="How often buffered metrics are sent.")
    timeout_s: float = Field(5.0, gt=0, description="Per-request timeout; an unreachable server never stalls training.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the tracked run (sweeps set their own).")


VlframeConfig.model_rebuild()

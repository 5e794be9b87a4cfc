"""The component kinds the registry knows: one record per kind, from which the rest is derived.

Each :class:`Kind` carries a :class:`KindRecord`: its wording, the hook that supplies it, the
factory's keyword arguments, the protocol what the factory returns must follow (a name in
:mod:`registry.protocols`), the config base its configs subclass (a name in
:mod:`registry.config`), and whether it becomes part of a model. The hook specifications
(:mod:`registry.hookspecs`), ``KIND_PROTOCOLS``, ``KIND_CONFIG_BASE``, ``MODULE_KINDS``, the
conformance kit's checks and the CLI's ``--kind`` choices are all read off these records, so a new
kind is one record here (plus its protocol and, if it needs one, its config base).

Names, not classes, keep this module free of imports: protocols and configs import :class:`Kind`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class KindRecord:
    """What vlframe knows of one kind of component."""

    #: Human wording, e.g. ``image encoder``.
    label: str
    #: Name of the hook that returns this kind's specs (``vlframe_image_encoders``).
    hook: str
    #: What the hook returns, completing "Return the ... this plugin provides".
    provides: str
    #: How the factory is called: ``factory(config, in_dim=int, ...)``.
    factory: str
    #: The protocol (a class name in :mod:`registry.protocols`) built objects follow.
    protocol: str
    #: The config base (a class name in :mod:`registry.config`) the kind's configs subclass.
    config_base: str = "ComponentConfig"
    #: Built objects become submodules of a model, so must be ``torch.nn.Module`` objects.
    module: bool = False
    #: More the hook's documentation says (what the factory receives, what its config declares).
    note: str = ""


class Kind(str, Enum):
    """A kind of component. The value is the name used in messages, in ``plugins list`` and in
    ``KIND.NAME`` keys; :attr:`record` says the rest."""

    def __new__(cls, value: str, record: KindRecord) -> Kind:
        member = str.__new__(cls, value)
        member._value_ = value
        member.record = record
        return member

    IMAGE_ENCODER = "image_encoder", KindRecord(
        "image encoder", "vlframe_image_encoders", "image encoders", "factory(config)", "ImageEncoder", module=True)
    TEXT_DECODER = "text_decoder", KindRecord(
        "text decoder", "vlframe_text_decoders", "unimodal text decoders (text encoders)",
        "factory(config, vocab_size=int, context_length=int, with_embedding=bool)", "TextDecoder", module=True)
    POOLER = "pooler", KindRecord(
        "pooler", "vlframe_poolers", "token poolers", "factory(config, in_dim=int, out_dim=int, num_prefix_tokens=int)",
        "Pooler", module=True,
        note="``out_dim`` is the size the model would like (a pooler that passes tokens through unchanged may keep "
             "``in_dim`` and say so in its ``out_dim``).")
    MULTIMODAL_DECODER = "multimodal_decoder", KindRecord(
        "multimodal decoder", "vlframe_multimodal_decoders", "multimodal (image-conditioned) text decoders",
        "factory(config, in_dim=int, context_dim=int)", "MultimodalDecoder", module=True)
    OBJECTIVE = "objective", KindRecord(
        "objective", "vlframe_objectives", "training objectives (losses)", "factory(config)", "Objective",
        config_base="ObjectiveConfig", module=True,
        note="The config's ``weight`` scales the loss; its class variable ``requires`` names the model outputs "
             "read, from :data:`registry.protocols.OUTPUTS`.")
    HEAD = "head", KindRecord(
        "head", "vlframe_heads", "task heads (projections, language-model heads)",
        "factory(config, in_dim=int, out_dim=int, tie_to=nn.Embedding | None)", "Head", module=True,
        note="``tie_to`` is offered to heads that can share the token embedding's weight.")
    MODEL = "model", KindRecord(
        "model", "vlframe_models", "model builders (e.g. ``coca``)", "factory(config, catalog=Catalog)", "Model",
        config_base="ModelConfig", module=True,
        note="The builder builds its parts through ``catalog.build(...)``; the model also follows each "
             "capability protocol it declares. ``vlframe.sdk.ModelBase`` provides the engine-facing members.")
    TOKENIZER = "tokenizer", KindRecord(
        "tokenizer", "vlframe_tokenizers", "tokenizers", "factory(config, vocab_size=int)", "Tokenizer",
        config_base="TokenizerConfig",
        note="``vocab_size`` is the model's vocabulary, an upper bound; the factory loads the trained tokenizer "
             "the config's ``path`` names.")
    DATASET = "dataset", KindRecord(
        "dataset", "vlframe_datasets", "image-text datasets", 'factory(config, split="train" | "val")', "MapDataset",
        note="Or a :class:`registry.protocols.StreamingDataset` (``streaming = True``; training only). A config "
             "subclassing :class:`registry.config.DatasetConfig` may say which paths it reads (``from_path``), so "
             "that ``--data PATH`` finds it.")
    IMPORTER = "importer", KindRecord(
        "importer", "vlframe_importers", "checkpoint importers (other frameworks' weights into vlframe)",
        "factory(config)", "Importer")
    TASK = "task", KindRecord(
        "task", "vlframe_tasks", "evaluation tasks (``vlframe eval --task NAME``, sweeps, validation)",
        "factory(config)", "Task", config_base="TaskConfig",
        note="The config's ``requires`` names the model capabilities needed; ``periodic`` marks a task "
             "training's validation runs.")
    PARALLEL = "parallel", KindRecord(
        "parallel strategy", "vlframe_parallel_strategies",
        "parallel strategies (how training spreads a model over ranks: replicas, shards, ...)",
        "factory(config)", "ParallelStrategy", config_base="ParallelConfig",
        note="Chosen by ``train.parallel`` (a name, or a block with the strategy's settings); the strategy whose "
             "config says ``default = True`` serves configs that name none.")
    TRACKING_SINK = "tracking_sink", KindRecord(
        "tracking sink", "vlframe_tracking_sinks", "tracking sinks (where a run's journal is delivered: MLflow, ...)",
        "factory(config, uri=str, timeout_s=float)", "TrackingSink", config_base="TrackingSinkConfig",
        note="Chosen by the scheme of the tracking URI (the config's ``schemes``); the sink whose config says "
             "``default = True`` names the URI of runs that configure none.")

    @property
    def label(self) -> str:
        """Human wording, e.g. ``image encoder``."""
        return self.record.label

    @property
    def article(self) -> str:
        """``an image encoder``, ``a pooler``: the label with its article."""
        return ("an " if self.label[0] in "aeiou" else "a ") + self.label

    @property
    def hook(self) -> str:
        """Name of the hook that returns the specs of this kind."""
        return self.record.hook


__all__ = ["Kind", "KindRecord"]

"""The component kinds the registry knows, and the hook that supplies each."""

from __future__ import annotations

from enum import Enum


class Kind(str, Enum):
    """A kind of component. The value is the name used in messages and in `plugins list`."""

    IMAGE_ENCODER = "image_encoder"
    TEXT_DECODER = "text_decoder"
    POOLER = "pooler"
    MULTIMODAL_DECODER = "multimodal_decoder"
    OBJECTIVE = "objective"
    HEAD = "head"
    MODEL = "model"
    TOKENIZER = "tokenizer"
    DATASET = "dataset"
    IMPORTER = "importer"
    TASK = "task"

    @property
    def label(self) -> str:
        """Human wording, e.g. ``image encoder``."""
        return self.value.replace("_", " ")

    @property
    def article(self) -> str:
        """``an image encoder``, ``a pooler``: the label with its article."""
        return ("an " if self.value[0] in "aeiou" else "a ") + self.label

    @property
    def hook(self) -> str:
        """Name of the hook that returns the specs of this kind."""
        return _HOOKS[self]


_HOOKS = {
    Kind.IMAGE_ENCODER: "vlframe_image_encoders",
    Kind.TEXT_DECODER: "vlframe_text_decoders",
    Kind.POOLER: "vlframe_poolers",
    Kind.MULTIMODAL_DECODER: "vlframe_multimodal_decoders",
    Kind.OBJECTIVE: "vlframe_objectives",
    Kind.HEAD: "vlframe_heads",
    Kind.MODEL: "vlframe_models",
    Kind.TOKENIZER: "vlframe_tokenizers",
    Kind.DATASET: "vlframe_datasets",
    Kind.IMPORTER: "vlframe_importers",
    Kind.TASK: "vlframe_tasks",
}

"""What a vlframe model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class ModelOutput:
    """Losses by objective name (unweighted), their weighted total, and the tensors computed.

    ``image_embeds``/``text_embeds`` are L2-normalised contrastive embeddings ``(B, E)``;
    ``logits`` are next-token logits ``(B, L, V)``. Each is None when the model has no such part.
    """

    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    image_embeds: Tensor | None = None
    text_embeds: Tensor | None = None
    logits: Tensor | None = None

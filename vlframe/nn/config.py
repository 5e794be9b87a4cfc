"""Config fields shared by components built from a stack of transformer blocks."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from registry import ComponentConfig, raise_problems
from vlframe.nn.transformer import ACTIVATIONS


# Past these a size is a typo, not a model (the widest published transformers are ~20k wide and
# ~200 layers deep): refused at validation, before anything is built.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 1024
MAX_HEADS = 1024


class TransformerConfig(ComponentConfig):
    """Width, depth, heads and MLP of a transformer stack; plugins extend it with their own fields."""

    width: int = Field(512, gt=0, le=MAX_WIDTH)
    layers: int = Field(6, ge=0, le=MAX_LAYERS)
    heads: int = Field(8, gt=0, le=MAX_HEADS)
    mlp_dim: int | None = Field(None, gt=0, le=16 * MAX_WIDTH, description="MLP hidden size; default 4 x width.")
    activation: str = Field("gelu", description=f"One of {sorted(ACTIVATIONS)}.")
    norm_eps: float = Field(1e-5, gt=0)

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or 4 * self.width

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, name: str) -> str:
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{name}'; available: {', '.join(sorted(ACTIVATIONS))}")
        return name

    def shape_problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Conflicts between fields, as ``(location, message)``; subclasses add their own."""
        if self.width % self.heads:
            return [(("heads",), f"{self.heads} heads do not divide width {self.width}")]
        return []

    @model_validator(mode="after")
    def _check_shape(self) -> TransformerConfig:
        raise_problems(type(self).__name__, self.shape_problems())
        return self

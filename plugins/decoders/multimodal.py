"""Multimodal text decoder: causal self-attention plus cross-attention to image tokens.

Takes the unimodal decoder's token states and the (pooled) image tokens; its output feeds the
language-model head that generates captions.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import Tensor, nn

from registry import ComponentConfig, ComponentSpec, hookimpl
from vlframe.nn import ACTIVATIONS, Block, init_weights


class MultimodalDecoderConfig(ComponentConfig):
    width: int = Field(512, gt=0)
    layers: int = Field(6, gt=0, description="Multimodal layers (the paper's n_multi).")
    heads: int = Field(8, gt=0)
    mlp_dim: int | None = Field(None, gt=0, description="MLP hidden size; default 4 x width.")
    activation: str = Field("gelu", description=f"One of {sorted(ACTIVATIONS)}.")
    norm_eps: float = Field(1e-5, gt=0)

    @model_validator(mode="after")
    def _check(self) -> MultimodalDecoderConfig:
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} does not divide width={self.width}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation '{self.activation}' is not one of {sorted(ACTIVATIONS)}")
        return self


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: MultimodalDecoderConfig, *, in_dim: int, context_dim: int) -> None:
        super().__init__()
        self.width = cfg.width
        # A unimodal tower of another width is bridged by a projection.
        self.proj_in = nn.Identity() if in_dim == cfg.width else nn.Linear(in_dim, cfg.width)
        mlp_dim = cfg.mlp_dim or 4 * cfg.width
        self.blocks = nn.ModuleList(
            Block(
                cfg.width,
                cfg.heads,
                mlp_dim,
                causal=True,
                cross_dim=context_dim,
                activation=cfg.activation,
                norm_eps=cfg.norm_eps,
            )
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.apply(init_weights)

    def forward(self, states: Tensor, mask: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        x = self.proj_in(states)
        for block in self.blocks:
            x = block(x, mask, context, context_mask)
        return self.norm(x)


@hookimpl
def vlframe_multimodal_decoders() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="multimodal",
            config=MultimodalDecoderConfig,
            factory=MultimodalDecoder,
            summary="Causal self-attention + cross-attention to image tokens, for captioning.",
        )
    ]

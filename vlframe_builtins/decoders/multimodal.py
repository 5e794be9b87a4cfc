"""Multimodal text decoder: causal self-attention plus cross-attention to image tokens.

Takes the unimodal decoder's token states and the (pooled) image tokens; its output feeds the
language-model head that generates captions.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from registry import ComponentSpec, hookimpl
from vlframe.sdk import MAX_LAYERS, Block, KVCache, TransformerConfig, init_weights


class MultimodalDecoderConfig(TransformerConfig):
    layers: int = Field(6, gt=0, le=MAX_LAYERS, description="Multimodal layers (the paper's n_multi).")
    cross_mlp: bool = Field(
        False, description="A second MLP after each cross-attention: self-attention, MLP, cross-attention, MLP "
        "(open_clip's CoCa); false: self-attention, cross-attention, MLP.")
    pad_mask: bool = Field(
        True, description="Hide padding keys in self-attention. open_clip's decoder does not (only the causal mask): "
        "real tokens are unaffected either way, padding positions' outputs differ.")


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: MultimodalDecoderConfig, *, in_dim: int, context_dim: int) -> None:
        super().__init__()
        self.width = cfg.width
        self.pad_mask = cfg.pad_mask
        # A unimodal tower of another width is bridged by a projection.
        self.proj_in = nn.Identity() if in_dim == cfg.width else nn.Linear(in_dim, cfg.width)
        self.blocks = nn.ModuleList(
            Block(
                cfg.width,
                cfg.heads,
                cfg.mlp_hidden,
                causal=True,
                cross_dim=context_dim,
                activation=cfg.activation,
                norm_eps=cfg.norm_eps,
                cross_mlp=cfg.cross_mlp,
            )
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)

    def forward(self, states: Tensor, mask: Tensor | None, context: Tensor | None,
                context_mask: Tensor | None = None, *, cache: KVCache | None = None) -> Tensor:
        """``cache``: incremental decoding (``states`` are the new positions; ``context`` may be
        None once the first call has projected it)."""
        x = self.proj_in(states)
        mask = mask if self.pad_mask else None
        for block in self.blocks:
            x = block(x, mask, context, context_mask, cache=cache)
        return self.norm(x)


@hookimpl
def vlframe_multimodal_decoders() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="multimodal",
            config=MultimodalDecoderConfig,
            factory=MultimodalDecoder,
            summary="Causal self-attention + cross-attention to image tokens, for captioning.",
            example={"type": "multimodal", "width": 32, "layers": 2, "heads": 2},  # small, for the conformance kit
        )
    ]

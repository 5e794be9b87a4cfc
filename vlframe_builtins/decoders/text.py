"""Unimodal causal text decoder: CoCa's text tower.

Token and position embeddings, then causal pre-norm blocks without cross-attention. For the
contrastive text embedding it either appends a learned CLS token at the end of the sequence
(the paper's choice: the causal mask lets it see the whole caption) or mean-pools the tokens
(the paper's ablation). The per-token states go on to the multimodal decoder.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from registry import ComponentSpec, hookimpl
from vlframe.sdk import MAX_LAYERS, Block, KVCache, TransformerConfig, init_weights


class TextDecoderConfig(TransformerConfig):
    layers: int = Field(6, ge=0, le=MAX_LAYERS, description="Unimodal layers (the paper's n_uni).")
    embedding: Literal["cls", "mean"] = Field(
        "cls", description="Contrastive text embedding: appended CLS token, or mean of the tokens."
    )
    padding_mask: Literal["standard", "open_clip_legacy"] = Field(
        "standard", description="standard: padding keys are hidden. open_clip_legacy: the padding mask shifted one "
        "key right, as open_clip's CoCa weights were trained (the CLS sees the first padding token, not itself; "
        "the other tokens are unaffected). Needs texts padded to the context length.")


class TextDecoder(nn.Module):
    def __init__(self, cfg: TextDecoderConfig, *, vocab_size: int, context_length: int, with_embedding: bool,
                 with_mask_token: bool = False) -> None:
        super().__init__()
        self.width = cfg.width
        self.context_length = context_length
        self.mode = cfg.embedding if with_embedding else None
        self.legacy_mask = cfg.padding_mask == "open_clip_legacy"
        self.token_embedding = nn.Embedding(vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(context_length, cfg.width))
        # The CLS token needs no position: it is always last and learns its own vector.
        self.cls_token = nn.Parameter(torch.zeros(cfg.width)) if self.mode == "cls" else None
        # CapPa's parallel prediction: inputs replaced by one learned vector (the builder asks for it).
        self.mask_token = nn.Parameter(torch.zeros(cfg.width)) if with_mask_token else None
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_hidden, causal=True, activation=cfg.activation, norm_eps=cfg.norm_eps)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if self.mode else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every weight (also on a model built on the meta device, e.g. for FSDP)."""
        self.apply(init_weights)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "mask_token"}

    def forward(self, tokens: Tensor, mask: Tensor | None, *, embed: bool = True,
                cache: KVCache | None = None, masked: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Token states ``(B, L, width)`` and the text embedding (None without one, or ``embed=False``).

        Generation passes ``embed=False`` (no CLS token: the causal mask keeps it from changing the
        token states anyway) and a ``cache``: ``tokens`` are then the new positions only.
        """
        b, length = tokens.shape
        start = cache.offset if cache is not None else 0
        if start + length > self.context_length:
            raise ValueError(f"text of {start + length} tokens exceeds context_length {self.context_length}")
        x = self.token_embedding(tokens)
        if masked is not None:  # (B, L) bool: these inputs are the mask token (parallel prediction)
            if self.mask_token is None:
                raise ValueError("masked inputs need a decoder built with_mask_token")
            x = torch.where(masked[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed[start : start + length]
        with_cls = cache is None and embed and self.mode == "cls"
        if with_cls and self.legacy_mask and start + length != self.context_length:
            # The CLS vector carries the position after a full context (folded in at conversion)
            # and the shifted mask assumes padding after the text: both need the whole context.
            raise ValueError(f"padding_mask open_clip_legacy needs texts padded to context_length "
                             f"{self.context_length}, got {length} tokens (tokenizer.pad_to_context: true)")
        keys = mask  # None: every key is real
        if mask is not None:
            keys = torch.cat([mask, mask.new_ones(b, 1)], dim=1) if with_cls else mask
            if self.legacy_mask:  # key j is hidden when token j-1 is padding; key 0 is always seen
                keys = torch.cat([mask.new_ones(b, 1), mask], dim=1)[:, : keys.shape[1]]
        if with_cls:
            x = torch.cat([x, self.cls_token.expand(b, 1, -1)], dim=1)
        for block in self.blocks:
            x = block(x, keys, cache=cache)
        if cache is not None or not embed or self.mode is None:
            return x, None
        if self.mode == "cls":
            return x[:, :-1], self.norm(x[:, -1])
        if mask is None:
            return x, self.norm(x.mean(dim=1))
        weights = mask.unsqueeze(-1).to(x.dtype)  # mean of the real tokens
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return x, self.norm(pooled)


@hookimpl
def vlframe_text_decoders() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="causal_text",
            config=TextDecoderConfig,
            factory=TextDecoder,
            summary="Unimodal causal text decoder; CLS token (appended) or mean-pooled text embedding.",
            example={"type": "causal_text", "width": 32, "layers": 2, "heads": 2},  # small, for the conformance kit
        )
    ]

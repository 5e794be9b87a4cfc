"""Poolers: how image tokens are summarised for the decoder and for the contrastive embedding.

- ``attentional``: n learned queries cross-attend to the tokens (CoCa: 256 for captioning,
  1 for the contrastive embedding).
- ``cls``: the first (class) token.
- ``mean``: the mean of the tokens (after any class token).
- ``none``: every token unchanged (the paper's n_query = 0).

Whether the contrastive pooler reads the captioning pooler's output (cascade) or the image
tokens (parallel) is the model's choice, not the pooler's.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from registry import ComponentConfig, ComponentSpec, hookimpl, raise_problems
from vlframe.sdk import Attention, init_weights


class AttentionalPoolerConfig(ComponentConfig):
    n_query: int = Field(256, gt=0, le=65536, description="Number of learned queries (tokens out).")
    heads: int = Field(8, gt=0, le=1024)
    norm_eps: float = Field(1e-5, gt=0)
    query_norm: bool = Field(False, description="LayerNorm on the learned queries before they attend (open_clip).")
    summary_queries: int = Field(
        0, ge=0, description="The first n outputs summarise the image: the multimodal decoder attends only to the "
        "others, and a cascaded contrastive pooler sees all (open_clip's CoCa: 1 of 256, read by 'cls'). Without a "
        "cascaded contrastive pooler (an ablation) they are left unread.")

    @model_validator(mode="after")
    def _summary_fits(self) -> AttentionalPoolerConfig:
        if self.summary_queries >= self.n_query:
            raise_problems("AttentionalPoolerConfig", [(("summary_queries",), f"{self.summary_queries} leaves none "
                                                        f"of the {self.n_query} queries for the decoder")])
        return self


class AttentionalPooler(nn.Module):
    def __init__(self, cfg: AttentionalPoolerConfig, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.out_dim = out_dim
        # Summary outputs come first, like a class token: a cascaded cls pooler takes them.
        self.num_prefix_tokens_out = self.summary_tokens = cfg.summary_queries
        self.queries = nn.Parameter(torch.randn(cfg.n_query, out_dim) * out_dim**-0.5)
        self.norm_queries = nn.LayerNorm(out_dim, eps=cfg.norm_eps) if cfg.query_norm else None
        self.norm_tokens = nn.LayerNorm(in_dim, eps=cfg.norm_eps)
        self.attn = Attention(out_dim, cfg.heads, kv_dim=in_dim)
        self.norm = nn.LayerNorm(out_dim, eps=cfg.norm_eps)
        self.attn.apply(init_weights)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.queries, std=self.out_dim**-0.5)
        for norm in (self.norm_queries, self.norm_tokens, self.norm):
            if norm is not None:
                norm.reset_parameters()
        self.attn.apply(init_weights)

    def no_weight_decay(self) -> set[str]:
        return {"queries"}

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        queries = self.queries if self.norm_queries is None else self.norm_queries(self.queries)
        queries = queries.expand(tokens.shape[0], -1, -1)
        return self.norm(self.attn(queries, tokens, key_mask=mask, context_norm=self.norm_tokens))


class ProjectConfig(ComponentConfig):
    project: bool = Field(
        False, description="Add a linear projection to the model's width (otherwise keep the input width)."
    )


class _SimplePooler(nn.Module):
    """Shared shape of the parameter-free poolers: select tokens, optionally project."""

    def __init__(self, cfg: ProjectConfig, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Linear(in_dim, out_dim) if cfg.project else nn.Identity()
        self.out_dim = out_dim if cfg.project else in_dim

    def select(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.proj(self.select(tokens, mask))


class ClsPooler(_SimplePooler):
    def __init__(self, cfg: ProjectConfig, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        if num_prefix_tokens < 1:
            raise ValueError(
                "the cls pooler needs a class token, and its input has none (use "
                "pooler_arrangement: parallel with an image encoder that has one, e.g. vit with class_token: true)"
            )
        super().__init__(cfg, in_dim=in_dim, out_dim=out_dim, num_prefix_tokens=num_prefix_tokens)

    def select(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        return tokens[:, :1]


class MeanPooler(_SimplePooler):
    def select(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        tokens = tokens[:, self.num_prefix_tokens :]
        if mask is None:
            return tokens.mean(dim=1, keepdim=True)
        weights = mask[:, self.num_prefix_tokens :].unsqueeze(-1).to(tokens.dtype)
        return (tokens * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)


class IdentityPooler(_SimplePooler):
    def __init__(self, cfg: ProjectConfig, *, in_dim: int, out_dim: int, num_prefix_tokens: int = 0) -> None:
        super().__init__(cfg, in_dim=in_dim, out_dim=out_dim, num_prefix_tokens=num_prefix_tokens)
        self.num_prefix_tokens_out = num_prefix_tokens  # passed through with the other tokens

    def select(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        return tokens


@hookimpl
def vlframe_poolers() -> list[ComponentSpec]:
    return [
        ComponentSpec("attentional", AttentionalPoolerConfig, AttentionalPooler,
                      "n learned queries cross-attending to the tokens (CoCa's pooler)."),
        ComponentSpec("cls", ProjectConfig, ClsPooler, "The class token (the first token)."),
        ComponentSpec("mean", ProjectConfig, MeanPooler, "Mean of the tokens after any class token."),
        ComponentSpec("none", ProjectConfig, IdentityPooler, "All tokens unchanged (the paper's n_query = 0)."),
    ]

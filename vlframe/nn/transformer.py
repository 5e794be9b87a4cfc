"""Compact transformer building blocks shared by the built-in encoders, decoders and poolers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlframe.nn.attention import Attention
from vlframe.nn.cache import KVCache
from vlframe.nn.recompute import norm_linear, recomputed_linear


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation of the original CLIP weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "relu": nn.ReLU}


class MLP(nn.Module):
    """Linear, activation, linear; the hidden activation may be recomputed in backward instead of
    stored (``train.recompute``: ``activation``)."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, norm: nn.LayerNorm | None = None) -> Tensor:
        """``x`` may be un-normalised, with ``norm`` the LayerNorm to apply first (fused, see above)."""
        h = norm_linear(x, norm, self.fc1) if norm is not None else self.fc1(x)
        return recomputed_linear(self.act, h, self.fc2)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, MLP.

    With ``cross_dim`` set, the block also attends to a context (image tokens); the context gets
    its own LayerNorm before the key/value projection. ``cross_mlp`` gives the cross-attention an
    MLP of its own: self-attention, MLP, cross-attention, MLP (open_clip's multimodal layer).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        causal: bool = False,
        cross_dim: int | None = None,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
        cross_mlp: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, heads, causal=causal)
        self.cross = None
        if cross_dim is not None:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.norm_context = nn.LayerNorm(cross_dim, eps=norm_eps)
            self.cross = Attention(dim, heads, kv_dim=cross_dim)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLP(dim, mlp_dim, activation)
        self.cross_mlp = None
        if cross_mlp:
            if cross_dim is None:
                raise ValueError("cross_mlp needs cross-attention (cross_dim)")
            self.norm_cross_mlp = nn.LayerNorm(dim, eps=norm_eps)
            self.cross_mlp = MLP(dim, mlp_dim, activation)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        # Each LayerNorm is handed to the projection after it, which recomputes it in backward.
        x = x + self.attn(x, key_mask=mask, norm=self.norm1, cache=cache)
        if self.cross is None:
            return x + self.mlp(x, norm=self.norm2)
        if self.cross_mlp is not None:
            x = x + self.mlp(x, norm=self.norm2)
        x = x + self.cross(x, context, key_mask=context_mask, norm=self.norm_cross, context_norm=self.norm_context,
                           cache=cache)
        if self.cross_mlp is not None:
            return x + self.cross_mlp(x, norm=self.norm_cross_mlp)
        return x + self.mlp(x, norm=self.norm2)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear weights, zero biases, unit LayerNorms: apply with ``module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)

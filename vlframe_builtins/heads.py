"""Task heads: projections into the contrastive embedding space, and the language-model head."""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from registry import ComponentConfig, ComponentSpec, hookimpl
from vlframe.sdk import MAX_WIDTH, init_weights


class LinearConfig(ComponentConfig):
    bias: bool = False


class Linear(nn.Linear):
    def __init__(self, cfg: LinearConfig, *, in_dim: int, out_dim: int, tie_to: nn.Embedding | None = None) -> None:
        super().__init__(in_dim, out_dim, bias=cfg.bias)
        self._built = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not getattr(self, "_built", False):  # nn.Linear's own call while constructing
            return super().reset_parameters()
        nn.init.normal_(self.weight, std=self.in_features**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class MLPConfig(ComponentConfig):
    hidden_dim: int | None = Field(None, gt=0, le=16 * MAX_WIDTH, description="Hidden size; default in_dim.")


class MLPProjection(nn.Sequential):
    def __init__(self, cfg: MLPConfig, *, in_dim: int, out_dim: int, tie_to: nn.Embedding | None = None) -> None:
        hidden = cfg.hidden_dim or in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)


class LMHeadConfig(ComponentConfig):
    tied: bool = Field(False, description="Share the weight of the text decoder's token embedding.")
    bias: bool = False


class LMHead(nn.Module):
    def __init__(self, cfg: LMHeadConfig, *, in_dim: int, out_dim: int, tie_to: nn.Embedding | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=cfg.bias)
        if cfg.tied:
            if tie_to is None:
                raise ValueError("tied: true, but there is no token embedding to tie to")
            if tuple(tie_to.weight.shape) != (out_dim, in_dim):
                raise ValueError(
                    f"tied: true needs the decoder width ({in_dim}) to equal the token embedding "
                    f"width ({tie_to.weight.shape[1]})"
                )
            self.proj.weight = tie_to.weight
        self.tied = cfg.tied
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if not self.tied:  # a tied weight is the token embedding's, initialised there
            init_weights(self.proj)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


@hookimpl
def vlframe_heads() -> list[ComponentSpec]:
    return [
        ComponentSpec("linear", LinearConfig, Linear, "Linear projection (no bias by default)."),
        ComponentSpec("mlp", MLPConfig, MLPProjection, "Two-layer MLP projection."),
        ComponentSpec("lm_head", LMHeadConfig, LMHead, "Language-model head, optionally tied to the token embedding."),
    ]

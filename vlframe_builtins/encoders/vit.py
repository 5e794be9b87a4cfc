"""Native Vision Transformer image encoder (Dosovitskiy et al.), as CoCa's image tower.

Patchify with a strided convolution, add positions (learned, or the fixed 2-D sine-cosine table of
MAE and big_vision's plain ViT), run pre-norm blocks, finish with a LayerNorm (or leave that to the
pooler). Returns every token: poolers downstream decide how to summarise them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from registry import ComponentSpec, hookimpl
from vlframe.sdk import MAX_LAYERS, MAX_WIDTH, Block, TransformerConfig, init_weights

MAX_IMAGE_SIZE = 8192


class ViTConfig(TransformerConfig):
    image_size: int = Field(224, gt=0, le=MAX_IMAGE_SIZE, description="Input height and width in pixels.")
    patch_size: int = Field(16, gt=0, le=MAX_IMAGE_SIZE)
    width: int = Field(768, gt=0, le=MAX_WIDTH)
    layers: int = Field(12, gt=0, le=MAX_LAYERS)
    heads: int = Field(12, gt=0, le=1024)
    class_token: bool = Field(False, description="Prepend a learned class token (for the 'cls' pooler).")
    pos_embed: Literal["learned", "sincos"] = Field(
        "learned", description="Patch positions: learned (CLIP, open_clip) or a fixed 2-D sine-cosine table "
        "(MAE, big_vision's plain ViT; nothing to learn, no parameter in the weights).")
    patch_bias: bool = Field(True, description="Bias in the patch embedding (CLIP/open_clip towers have none).")
    final_norm: bool = Field(
        True, description="LayerNorm on the output tokens; false when the pooler normalises its own output "
        "(open_clip's CoCa: ln_post comes after the attentional pooler).")

    def shape_problems(self) -> list[tuple[tuple[str, ...], str]]:
        problems = super().shape_problems()
        if self.image_size % self.patch_size:
            problems.append((("image_size",), f"{self.image_size} is not a multiple of patch_size {self.patch_size}"))
        if self.pos_embed == "sincos" and self.width % 4:
            problems.append((("width",), f"{self.width} is not a multiple of 4 (pos_embed sincos)"))
        return problems


def sincos_2d(grid: int, width: int, temperature: float = 10_000.0) -> Tensor:
    """``(grid * grid, width)`` fixed positions, row-major like the patches: a quarter of the
    channels each for sin and cos of the column and of the row, at geometric frequencies."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    x, y = cols.flatten()[:, None] * omega, rows.flatten()[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1).float()


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.width = cfg.width
        self.image_size = cfg.image_size
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.learned_positions = cfg.pos_embed == "learned"
        if self.learned_positions:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + grid * grid, cfg.width))
        else:  # a buffer left out of the state dict: made from the config (reset_parameters), never loaded
            self.register_buffer("pos_embed", torch.zeros(1, self.num_prefix_tokens + grid * grid, cfg.width),
                                 persistent=False)
        self.norm_pre = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_hidden, activation=cfg.activation, norm_eps=cfg.norm_eps)
            for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.apply(init_weights)
        if self.learned_positions:
            nn.init.normal_(self.pos_embed, std=0.02)
        else:  # also on a model materialised from the meta device, whose buffers start empty
            with torch.no_grad():
                self.pos_embed.zero_()
                grid = self.image_size // self.patch_embed.stride[0]
                self.pos_embed[0, self.num_prefix_tokens :] = sincos_2d(grid, self.width)
        if self.class_token is not None:
            nn.init.normal_(self.class_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "class_token"} if self.learned_positions else {"class_token"}

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@hookimpl
def vlframe_image_encoders() -> list[ComponentSpec]:
    return [
        ComponentSpec(
            name="vit",
            config=ViTConfig,
            factory=VisionTransformer,
            summary="Vision Transformer built natively from vlframe blocks (returns all tokens).",
            example={"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},  # small, for the conformance kit
        )
    ]

"""Compact transformer building blocks shared by the built-in encoders, decoders and poolers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlframe.nn.attention import Attention


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation of the original CLIP weights."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "relu": nn.ReLU}


def _linear_grads(grad: Tensor, inputs: Tensor, weight: Tensor, bias: Tensor | None):
    """Gradients of ``linear(inputs)`` w.r.t. its input, weight and bias."""
    flat_grad = grad.reshape(-1, grad.shape[-1])
    grad_w = flat_grad.t() @ inputs.reshape(-1, inputs.shape[-1])
    return grad @ weight, grad_w, (flat_grad.sum(0) if bias is not None else None)


class _RecomputedLinear(torch.autograd.Function):
    """``linear(f(x))`` that keeps only ``x`` for backward and recomputes ``f(x)`` there.

    ``f`` is a LayerNorm before a projection or an activation inside an MLP. Stored, each would
    cost a second tensor of its input's size per layer, next to the one autograd keeps anyway;
    recomputing an elementwise or normalisation op costs far less than that memory.
    """

    @staticmethod
    def forward(ctx, fn, x: Tensor, weight: Tensor, bias: Tensor | None, *fn_params: Tensor) -> Tensor:  # type: ignore[override]
        ctx.fn = fn
        ctx.save_for_backward(x, weight, bias, *fn_params)
        return F.linear(fn(x, *fn_params), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, bias, *fn_params = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (x, *fn_params)]
            y = ctx.fn(*leaves)
        grad_y, grad_w, grad_b = _linear_grads(grad, y.detach(), weight, bias)
        grads = torch.autograd.grad(y, leaves, grad_y)
        return (None, grads[0], grad_w, grad_b, *grads[1:])


def _recomputed_linear(fn, x: Tensor, linear: nn.Linear, *fn_params: Tensor) -> Tensor:
    """``linear(fn(x))`` through :class:`_RecomputedLinear`, following autocast when it is on.

    Under autocast ``fn`` runs as autocast would run it (a LayerNorm in float32, an activation
    in its input's dtype), its output is cast to the autocast dtype, and the linear runs in that
    dtype; the Function itself runs with autocast off, on those explicit dtypes.
    """
    if not torch.is_grad_enabled():
        return linear(fn(x, *fn_params))
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _RecomputedLinear.apply(fn, x, linear.weight, linear.bias, *fn_params)
    dtype = torch.get_autocast_dtype(device)
    weight = linear.weight.to(dtype)
    bias = linear.bias.to(dtype) if linear.bias is not None else None

    def cast_fn(t: Tensor, *params: Tensor) -> Tensor:
        return fn(t, *params).to(dtype)

    with torch.autocast(device, enabled=False):
        return _RecomputedLinear.apply(cast_fn, x, weight, bias, *fn_params)


def norm_linear(x: Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> Tensor:
    """``linear(norm(x))``, recomputing the normalised tensor in backward instead of storing it.

    Only in full precision: under autocast the normalised tensor is stored in bf16 (half the
    size already), and recomputing the float32 LayerNorm measured slower than it saves.
    """
    if torch.is_autocast_enabled(x.device.type):
        return linear(norm(x))
    eps, shape = norm.eps, norm.normalized_shape

    def layer_norm(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.layer_norm(t, shape, w, b, eps)

    return _recomputed_linear(layer_norm, x, linear, norm.weight, norm.bias)


class MLP(nn.Module):
    """Linear, activation, linear; the hidden activation is recomputed in backward, not stored."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, norm: nn.LayerNorm | None = None) -> Tensor:
        """``x`` may be un-normalised, with ``norm`` the LayerNorm to apply first (fused, see above)."""
        h = norm_linear(x, norm, self.fc1) if norm is not None else self.fc1(x)
        return _recomputed_linear(self.act, h, self.fc2)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, optional cross-attention, MLP.

    With ``cross_dim`` set, the block also attends to a context (image tokens); the context gets
    its own LayerNorm before the key/value projection.
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

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        # Each LayerNorm is handed to the projection after it, which recomputes it in backward.
        x = x + self.attn(x, key_mask=mask, norm=self.norm1)
        if self.cross is not None:
            x = x + self.cross(x, context, key_mask=context_mask, norm=self.norm_cross, context_norm=self.norm_context)
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

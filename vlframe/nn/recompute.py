"""Linear layers that recompute their input's normalisation or activation in backward.

``linear(f(x))`` normally keeps both ``x`` (for ``f``'s backward) and ``f(x)`` (for the linear's
weight gradient). Keeping only ``x`` and recomputing ``f(x)`` in backward saves one tensor of
that size per use: the largest activations of a transformer (the MLP's hidden layer, and every
pre-norm's output) for the price of one elementwise or normalisation op.

What is recomputed is a choice (``train.recompute``), because the trade differs by precision and
CPU: ``norm`` (each pre-norm's output before its projection), ``activation`` (the MLP's hidden
activation) and ``caption_logits`` (the captioning loss scores the vocabulary in chunks whose
logits are recomputed in backward). ``auto`` takes the measured default of the precision the
step runs in (``DEFAULTS``; ``benchmarks/train_throughput.py --recompute`` measures them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


#: What may be recomputed in backward instead of kept.
PARTS = ("norm", "activation", "caption_logits")
#: ``auto``, by the precision a step computes in. Measured with benchmarks/train_throughput.py
#: --grid (coca_tiny, batch 32, 2 cores; README "Memory and speed"): in float32 every choice
#: steps within the noise of the others (0.59-0.66 s) while memory falls from 341 to 223 MiB, so
#: everything is recomputed; under bf16 autocast the pre-norm outputs are stored in bf16 and never
#: recomputed (slower than it saves), and recomputing the MLP and the caption logits takes the
#: step from 260 to 196 MiB (0.73x open_clip's) at 1.35-1.4x open_clip's throughput.
DEFAULTS: dict[str, frozenset[str]] = {"fp32": frozenset(PARTS), "bf16": frozenset({"activation", "caption_logits"})}

_chosen: ContextVar[frozenset[str] | None] = ContextVar("vlframe_recompute", default=None)


def resolve(setting: str | Iterable[str], precision: str) -> frozenset[str]:
    """The parts ``train.recompute`` names: ``auto`` (the precision's default), ``none``, ``all``, or a list."""
    if setting == "auto":
        return DEFAULTS["bf16" if precision in ("bf16", "fp16") else "fp32"]
    if setting == "none":
        return frozenset()
    if setting == "all":
        return frozenset(PARTS)
    parts = frozenset([setting] if isinstance(setting, str) else setting)
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"unknown recompute part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return parts


def set_recompute(parts: Iterable[str] | None) -> None:
    """Recompute exactly ``parts`` from now on in this context (None: by precision, ``auto``)."""
    _chosen.set(None if parts is None else resolve(list(parts), "fp32"))


@contextmanager
def recompute(parts: Iterable[str] | None) -> Iterator[None]:
    token = _chosen.set(None if parts is None else resolve(list(parts), "fp32"))
    try:
        yield
    finally:
        _chosen.reset(token)


def recomputing(part: str, device: str = "cpu") -> bool:
    """Whether ``part`` is recomputed in the step running now (``auto``: by its autocast state)."""
    chosen = _chosen.get()
    if chosen is None:
        chosen = DEFAULTS["bf16" if torch.is_autocast_enabled(device) else "fp32"]
    return part in chosen


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


def recomputed_linear(fn, x: Tensor, linear: nn.Linear, *fn_params: Tensor, part: str = "activation") -> Tensor:
    """``linear(fn(x))`` through :class:`_RecomputedLinear`, following autocast when it is on.

    Under autocast ``fn`` runs as autocast would run it (a LayerNorm in float32, an activation
    in its input's dtype), its output is cast to the autocast dtype, and the linear runs in that
    dtype; the Function itself runs with autocast off, on those explicit dtypes.
    """
    # Compiled, the plain composition: inductor's partitioner already recomputes cheap ops like
    # these in backward, and the Function's inner autograd.grad would break the graph.
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return linear(fn(x, *fn_params))
    device = x.device.type
    if not recomputing(part, device):
        return linear(fn(x, *fn_params))
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
    if torch.is_autocast_enabled(x.device.type) or not recomputing("norm", x.device.type):
        return linear(norm(x))
    eps, shape = norm.eps, norm.normalized_shape

    def layer_norm(t: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.layer_norm(t, shape, w, b, eps)

    return recomputed_linear(layer_norm, x, linear, norm.weight, norm.bias, part="norm")

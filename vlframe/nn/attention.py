"""The one attention module every block uses: self, causal, cross and pooling attention.

Masks are boolean ``(B, S)`` with ``True`` marking a real key. A query row that can see no key
(all keys padded, or causal with padding in front) yields zeros rather than NaN, in every
backend. The backend is a runtime switch (:func:`set_attention_backend`), not part of a weight:
``auto`` (the default: the fastest of the others for the case at hand), ``sdpa`` (torch's fused
kernels), ``eager`` (matmul, softmax, matmul in the input precision), ``math`` (a plain float32
reference) and ``triton`` (vlframe's fused kernels, the GPU hot path; on the CPU only under
``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlframe.nn.cache import KVCache
from vlframe.nn.recompute import norm_linear

#: ``fn(q, k, v, key_mask, causal) -> out`` with q ``(B, H, Lq, D)``, k/v ``(B, H, Lk, D)``.
AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool], Tensor]


def _attend_mask(key_mask: Tensor | None, causal: bool, lq: int, lk: int, device: torch.device) -> Tensor | None:
    """Boolean ``(B|1, 1, Lq, Lk)`` mask of allowed (query, key) pairs, or None for 'all'."""
    mask = None
    if key_mask is not None:
        mask = key_mask[:, None, None, :].to(torch.bool)
    if causal:
        # Queries and keys are aligned at the end, so a cross-length causal mask stays sensible.
        tri = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
        mask = tri[None, None] if mask is None else mask & tri
    return mask


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """torch's ``scaled_dot_product_attention``; fastest kernel torch picks for the case."""
    if key_mask is None and (not causal or q.shape[-2] == k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = _attend_mask(key_mask, causal, q.shape[-2], k.shape[-2], q.device)
    empty = ~mask.any(dim=-1, keepdim=True)
    # Let empty rows attend to everything (finite softmax and gradients), then zero them.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty)
    return out.masked_fill(empty, 0.0)


def math_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """Reference attention computed step by step in float32."""
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = _attend_mask(key_mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is None:
        return (scores.softmax(dim=-1) @ v).to(dtype)
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~(mask | empty), float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.masked_fill(empty, 0.0).to(dtype)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """Two matmuls around a softmax, all in the input precision (torch's CPU softmax accumulates
    bf16 in float32).

    On a CPU in bf16 at CoCa-tiny lengths (tens of tokens) this is 3-5x faster, forward and
    backward, than torch's CPU flash kernel, whose bf16 path is tuned for long sequences; it
    stores the (Lq, Lk) probabilities, so it is only chosen for short keys (see ``auto``).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    mask = _attend_mask(key_mask, causal, q.shape[-2], k.shape[-2], q.device)
    if mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    empty = ~mask.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~(mask | empty), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v).masked_fill(empty, 0.0)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """The fused Triton kernels (:mod:`vlframe.nn.triton_attention`), forward and backward."""
    from vlframe.nn.triton_attention import triton_attention as fused

    return fused(q, k, v, key_mask, causal)


def triton_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the Triton kernels cannot take this case (None when they can)."""
    try:
        from vlframe.nn.triton_attention import unsupported
    except ImportError as exc:  # triton comes with CUDA builds of torch; a CPU-only build lacks it
        return f"triton cannot be imported ({exc})"
    return unsupported(q, k, v)


_SAID: set[str] = set()


def _fall_back_once(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        warnings.warn(f"attention backend auto: using sdpa, not triton: {reason}", stacklevel=3)


#: Longest key sequence for which ``auto`` uses :func:`eager_attention` on a CPU in bf16/fp16.
EAGER_MAX_KEYS = 256


def auto_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """The fastest backend for the case at hand: the Triton kernels on CUDA where they support the
    case (saying once why not, otherwise), eager for short reduced-precision CPU work, else sdpa."""
    if q.device.type == "cuda":
        why = triton_unsupported(q, k, v)
        if why is None:
            return triton_attention(q, k, v, key_mask, causal)
        _fall_back_once(why)
        return sdpa_attention(q, k, v, key_mask, causal)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and k.shape[-2] <= EAGER_MAX_KEYS:
        return eager_attention(q, k, v, key_mask, causal)
    return sdpa_attention(q, k, v, key_mask, causal)


#: Attention backends by name, fixed at import (read-only).
BACKENDS: Mapping[str, AttentionFn] = MappingProxyType(
    {"auto": auto_attention, "sdpa": sdpa_attention, "eager": eager_attention, "math": math_attention,
     "triton": triton_attention}
)


def check_backend(name: str) -> str:
    """``name`` if it is an attention backend, else a ValueError listing the available ones."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend '{name}'; available: {', '.join(sorted(BACKENDS))}")
    return name


# Inside bidirectional(), causal self-attention attends both ways (CapPa's parallel prediction).
_BIDIRECTIONAL: ContextVar[bool] = ContextVar("vlframe_bidirectional", default=False)


@contextlib.contextmanager
def bidirectional() -> Iterator[None]:
    """Self-attention without its causal mask (padding still hidden) for the code run inside."""
    token = _BIDIRECTIONAL.set(True)
    try:
        yield
    finally:
        _BIDIRECTIONAL.reset(token)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs.

    Self-attention (``kv_dim is None``) uses one fused QKV projection; cross-attention and
    pooling project queries and keys/values separately, so keys may have another width.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        kv_dim: int | None = None,
        causal: bool = False,
        bias: bool = True,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} does not divide width {dim}")
        self.dim, self.heads, self.causal = dim, heads, causal
        self.is_cross = kv_dim is not None
        if self.is_cross:
            self.q_proj = nn.Linear(dim, dim, bias=bias)
            self.kv_proj = nn.Linear(kv_dim, 2 * dim, bias=bias)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_backend(name)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        key_mask: Tensor | None = None,
        *,
        norm: nn.LayerNorm | None = None,
        context_norm: nn.LayerNorm | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` ``(B, L, dim)`` to ``context`` (cross) or to ``x`` itself (self).

        ``key_mask`` ``(B, S)`` marks the real keys; ``None`` means all keys are real.
        ``norm``/``context_norm`` are pre-norms applied here, fused into the projections so that
        the normalised tensors are recomputed in backward rather than stored.
        With a ``cache`` (generation), self-attention appends this call's keys/values to the
        earlier ones (``key_mask`` then covers all keys) and cross-attention projects the
        context once; later calls may pass ``context=None``.
        """
        def project(t: Tensor, t_norm: nn.LayerNorm | None, linear: nn.Linear) -> Tensor:
            return norm_linear(t, t_norm, linear) if t_norm is not None else linear(t)

        b, lq, _ = x.shape
        h, d = self.heads, self.dim // self.heads
        if self.is_cross:
            q = project(x, norm, self.q_proj).view(b, lq, h, d).transpose(1, 2)
            cached = cache.cross(self) if cache is not None else None
            if cached is not None:
                k, v = cached
            elif context is None:
                raise ValueError("cross-attention needs a context")
            else:
                kv = project(context, context_norm, self.kv_proj)
                k, v = kv.view(b, context.shape[1], 2, h, d).permute(2, 0, 3, 1, 4)
                if cache is not None:
                    cache.set_cross(self, k, v)
        else:
            q, k, v = project(x, norm, self.qkv_proj).view(b, lq, 3, h, d).permute(2, 0, 3, 1, 4)
            if cache is not None:
                k, v = cache.extend(self, k, v)
                key_mask = cache.key_mask(key_mask, lq, b, x.device)
        # A single query is the newest position: causality hides nothing from it.
        causal = self.causal and lq > 1 and not (_BIDIRECTIONAL.get() and not self.is_cross)
        out = BACKENDS[self._backend](q, k, v, key_mask, causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.dim))


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Switch every :class:`Attention` inside ``module`` to ``backend``; return ``module``."""
    check_backend(backend)
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.backend = backend
    return module

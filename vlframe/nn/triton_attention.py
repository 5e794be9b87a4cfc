"""Fused attention in Triton, forward and backward: vlframe's GPU hot path.

One kernel family covers CoCa's four attention shapes natively: bidirectional image
self-attention, causal self-attention over padded text, cross-attention from text to image
tokens (query length != key length) and attentional pooling (1 to 256 learned queries). torch's
flash kernel takes no mask, so padded text falls back to slower kernels there; here the key
padding mask is read inside the kernel, block by block.

The algorithm is FlashAttention-2's: the forward walks key blocks with an online softmax and
stores each row's log-sum-exp; the backward recomputes the probabilities from it, one kernel
accumulating dK/dV per key block and one accumulating dQ per query block (no atomics, so the
result is deterministic). Semantics match :func:`vlframe.nn.attention.math_attention`: queries
and keys are aligned at the end for a causal mask (query i sees keys j <= i + Lk - Lq), and a
query row with no visible key gives zeros, with zero gradients.

Inputs are ``(B, H, L, D)`` with any batch/head/sequence strides and a contiguous last
dimension, in float32, float16 or bfloat16 (accumulation is float32 throughout). Head dims that
are not powers of two (80, 96) are padded to the next one by masking. Pointer arithmetic only
(``tl.make_block_ptr`` is deprecated in Triton 3.8 and gone in 3.9); written for Triton 3.6+.

Under ``TRITON_INTERPRET=1`` (the CPU tests) the kernels run on CPU tensors with one fixed
block configuration, and half-precision tiles are upcast to float32 before ``tl.dot``, which the
interpreter gets wrong in bf16.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: VLFRAME_TRITON_AUTOTUNE=0 compiles one configuration per kernel instead of searching (tests).
AUTOTUNE = os.environ.get("VLFRAME_TRITON_AUTOTUNE", "1") != "0"

#: Largest head dimension the kernels take (its tiles must fit in shared memory).
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs(kind: str) -> list[triton.Config]:
    """A handful of Hopper configurations (block sizes, warps, pipeline stages); one when interpreting."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 128, 4, 3), (16, 64, 4, 3)]
    else:
        shapes = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# Autotuning is keyed on bucketed lengths (next power of two), so each padded text length does
# not trigger a new search.
_KEY = ["BUCKET_Q", "BUCKET_K", "BLOCK_D", "CAUSAL", "HAS_MASK", "FP32"]


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    # float32 inputs: exact products ("ieee"), as the float32 reference computes them.
    if FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.autotune(configs=_configs("fwd"), key=_KEY)
@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KMASK,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, smb,
    H, LQ, LK, D, scale,
    BUCKET_Q, BUCKET_K,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: big batches overflow 32-bit products
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = scale * 1.4426950408889634  # log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    shift = LK - LQ  # causal: query i sees keys j <= i + shift
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, tl.maximum(0, (pid_m + 1) * BLOCK_M + shift))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + cols[:, None] * svn + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, kt, FP32) * qk_scale  # log2 units: exp2 is the hardware's exponential
        allowed = col_ok[None, :] & (rows[:, None] >= 0)
        if HAS_MASK:
            real = tl.load(KMASK + b * smb + cols, mask=col_ok, other=0)
            allowed = allowed & (real != 0)[None, :]
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= rows[:, None] + shift)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32)
        m_i = m_new
    seen = l_i > 0.0
    denom = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / denom[:, None], 0.0)
    # The log-sum-exp in log2 units; a row that saw no key stores +inf, so that the backward's
    # exp2(s - lse) is 0 everywhere in it.
    lse = tl.where(seen, m_i + tl.log2(denom), float("inf"))
    tl.store(O + b * sob + h * soh + rows[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * LQ + rows, lse, mask=row_ok)


@triton.jit
def _probabilities(q, kt, lse, rows, cols, row_ok, col_ok, real, LQ, LK, scale,
                   CAUSAL: tl.constexpr, FP32: tl.constexpr):
    """The forward's softmax probabilities of one (query block, key block) tile, recomputed
    (``lse`` in log2 units, as the forward stored it)."""
    s = _dot(q, kt, FP32) * (scale * 1.4426950408889634)
    allowed = row_ok[:, None] & col_ok[None, :] & real[None, :]
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None] + (LK - LQ))
    return tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)


@triton.autotune(configs=_configs("bwd"), key=_KEY)
@triton.jit
def _attn_bwd_kv(
    Q, K, V, DO, LSE, DELTA, KMASK, DK, DV,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, smb,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, LQ, LK, D, scale,
    BUCKET_Q, BUCKET_K,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: big batches overflow 32-bit products
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < LK
    d_ok = offs_d < D
    kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                 mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    vt = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_d[:, None],
                 mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    real = col_ok
    if HAS_MASK:
        real = real & (tl.load(KMASK + b * smb + cols, mask=col_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # the first query that sees this block's first key: i >= j - (LK - LQ)
        lo = (tl.maximum(0, pid_n * BLOCK_N - (LK - LQ)) // BLOCK_M) * BLOCK_M
    for start_m in range(lo, LQ, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < LQ
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
        p = _probabilities(q, kt, lse, rows, cols, row_ok, col_ok, real, LQ, LK, scale, CAUSAL, FP32)
        dv += _dot(tl.trans(p).to(do.dtype), do, FP32)
        dp = _dot(do, vt, FP32)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds).to(q.dtype), q, FP32)
    tile = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + b * sdkb + h * sdkh + cols[:, None] * sdkn + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=tile)
    tl.store(DV + b * sdvb + h * sdvh + cols[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=tile)


@triton.autotune(configs=_configs("bwd"), key=_KEY)
@triton.jit
def _attn_bwd_q(
    Q, K, V, DO, LSE, DELTA, KMASK, DQ,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, smb,
    sdqb, sdqh, sdqm,
    H, LQ, LK, D, scale,
    BUCKET_Q, BUCKET_K,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, FP32: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: big batches overflow 32-bit products
    h = (pid_bh % H).to(tl.int64)
    bh = pid_bh.to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < LQ
    d_ok = offs_d < D
    tile = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=tile, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=tile, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh * LQ + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * LQ + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = LK
    if CAUSAL:
        hi = tl.minimum(LK, tl.maximum(0, (pid_m + 1) * BLOCK_M + (LK - LQ)))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < LK
        kt = tl.load(K + b * skb + h * skh + cols[None, :] * skn + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(V + b * svb + h * svh + cols[None, :] * svn + offs_d[:, None],
                     mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        real = col_ok
        if HAS_MASK:
            real = real & (tl.load(KMASK + b * smb + cols, mask=col_ok, other=0) != 0)
        p = _probabilities(q, kt, lse, rows, cols, row_ok, col_ok, real, LQ, LK, scale, CAUSAL, FP32)
        dp = _dot(do, vt, FP32)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), FP32)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=tile)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 16))


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why these inputs cannot take the Triton kernels (None if they can)."""
    if q.device.type != "cuda" and not INTERPRET:
        return f"tensors on {q.device.type}, not CUDA"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (supported: float32, float16, bfloat16, all three alike)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    return None


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:  # type: ignore[override]
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        b, h, lq, d = q.shape
        lk = k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty(b * h, lq, device=q.device, dtype=torch.float32)
        mask = (key_mask.to(torch.int8).contiguous() if key_mask is not None
                else torch.ones(1, 1, device=q.device, dtype=torch.int8))
        meta = _meta(q, lq, lk, d, causal, key_mask is not None)
        _attn_fwd[lambda c: (triton.cdiv(lq, c["BLOCK_M"]), b * h)](
            q, k, v, out, lse, mask, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), mask.stride(0),
            h, lq, lk, d, d**-0.5, **meta)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.has_mask = causal, key_mask is not None
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, v, out, lse, mask = ctx.saved_tensors
        grad = _last_dim_contiguous(grad)
        b, h, lq, d = q.shape
        lk = k.shape[2]
        # delta_i = sum_d dO_id O_id, the softmax backward's row term (cheap: one pass in torch).
        delta = (grad.float() * out.float()).sum(-1).reshape(b * h, lq).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = _meta(q, lq, lk, d, ctx.causal, ctx.has_mask)
        common = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(grad), mask.stride(0))
        _attn_bwd_kv[lambda c: (triton.cdiv(lk, c["BLOCK_N"]), b * h)](
            q, k, v, grad, lse, delta, mask, dk, dv, *common, *_bhl(dk), *_bhl(dv), h, lq, lk, d, d**-0.5, **meta)
        _attn_bwd_q[lambda c: (triton.cdiv(lq, c["BLOCK_M"]), b * h)](
            q, k, v, grad, lse, delta, mask, dq, *common, *_bhl(dq), h, lq, lk, d, d**-0.5, **meta)
        return dq, dk, dv, None, None


def _bhl(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _meta(q: Tensor, lq: int, lk: int, d: int, causal: bool, has_mask: bool) -> dict:
    return {"BUCKET_Q": _bucket(lq), "BUCKET_K": _bucket(lk), "CAUSAL": causal, "HAS_MASK": has_mask,
            "FP32": q.dtype == torch.float32, "UPCAST": INTERPRET, "BLOCK_D": max(16, triton.next_power_of_2(d))}


def triton_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, causal: bool) -> Tensor:
    """Attention through the Triton kernels; same contract as the other backends."""
    why = unsupported(q, k, v)
    if why is not None:
        raise ValueError(f"the triton attention backend cannot run this case: {why}")
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool).expand(q.shape[0], k.shape[2])
    return _TritonAttention.apply(q, k, v, key_mask, causal)

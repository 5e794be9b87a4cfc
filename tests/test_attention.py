"""The attention module: every backend against a plain reference, masks, empty rows."""

from __future__ import annotations

import math
import os

import pytest
import torch

from numerics import assert_close

from vlframe.nn import BACKENDS, Attention, set_attention_backend
from vlframe.nn.attention import EAGER_MAX_KEYS, auto_attention, eager_attention, math_attention, sdpa_attention


def reference(q, k, v, key_mask, causal):
    """Loop-free but literal float64 attention, written independently of the backends."""
    q, k, v = q.double(), k.double(), v.double()
    b, h, lq, d = q.shape
    lk = k.shape[2]
    allowed = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    if key_mask is not None:
        allowed &= key_mask[:, None, None, :]
    if causal:
        for i in range(lq):
            allowed[:, :, i, i + 1 + (lk - lq):] = False
    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    for bi in range(b):
        for i in range(lq):
            keep = allowed[bi, 0, i]
            if keep.any():
                w = torch.softmax(scores[bi, :, i, keep], dim=-1)
                out[bi, :, i] = torch.einsum("hk,hkd->hd", w, v[bi][:, keep])
    return out


# The Triton backend runs on CPU tensors only under the interpreter (tests/test_triton_attention.py
# covers it in depth; scripts/test.sh sets TRITON_INTERPRET=1 before Python starts).
RUNNABLE = [b for b in sorted(BACKENDS) if b != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]

CASES = {
    # name: (lq, lk, causal, padded)
    "self": (7, 7, False, False),
    "self_padded": (7, 7, False, True),
    "causal_text_padded": (9, 9, True, True),
    "cross": (5, 11, False, True),
    "pool_1_query": (1, 11, False, True),
    "pool_many": (13, 6, False, False),
}


def _inputs(lq, lk, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, lq, 8, generator=g)
    k = torch.randn(3, 2, lk, 8, generator=g)
    v = torch.randn(3, 2, lk, 8, generator=g)
    mask = None
    if padded:
        lengths = torch.tensor([lk, max(1, lk - 3), 1])
        mask = torch.arange(lk)[None, :] < lengths[:, None]
    return q, k, v, mask


@pytest.mark.parametrize("backend", RUNNABLE)
@pytest.mark.parametrize("case", sorted(CASES))
def test_backends_match_reference(backend: str, case: str) -> None:
    lq, lk, causal, padded = CASES[case]
    q, k, v, mask = _inputs(lq, lk, padded)
    out = BACKENDS[backend](q, k, v, mask, causal)
    assert_close(out, reference(q, k, v, mask, causal), dtype=torch.float32, depth="layer")


@pytest.mark.parametrize("fn", [sdpa_attention, eager_attention, math_attention, auto_attention])
def test_rows_without_valid_keys_are_zero_with_finite_gradients(fn) -> None:
    q, k, v, _ = _inputs(4, 6, False)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # example 1 has no real key at all
    for t in (q, k, v):
        t.requires_grad_(True)
    out = fn(q, k, v, mask, False)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1]))


def test_module_self_and_cross_attention_agree_across_backends() -> None:
    torch.manual_seed(0)
    self_attn = Attention(16, 4, causal=True)
    cross = Attention(16, 4, kv_dim=24)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ctx_mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4], dtype=torch.bool)
    results = {}
    for backend in RUNNABLE:
        set_attention_backend(self_attn, backend)
        set_attention_backend(cross, backend)
        results[backend] = (self_attn(x, key_mask=mask), cross(x, ctx, key_mask=ctx_mask))
    for backend in RUNNABLE:
        for a, b in zip(results[backend], results["math"]):
            assert_close(a, b, depth="layer", what=backend)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_backends_agree_and_auto_picks_eager_for_short_cpu_keys(case: str, monkeypatch) -> None:
    lq, lk, causal, padded = CASES[case]
    q, k, v, mask = (t.to(torch.bfloat16) if t is not None and t.is_floating_point() else t
                     for t in _inputs(lq, lk, padded))
    want = reference(q.float(), k.float(), v.float(), mask, causal)
    for fn in (sdpa_attention, eager_attention):
        assert_close(fn(q, k, v, mask, causal), want, dtype=torch.bfloat16, depth="layer")
    chosen = []
    import vlframe.nn.attention as attention

    monkeypatch.setattr(attention, "eager_attention", lambda *a: chosen.append("eager") or eager_attention(*a))
    monkeypatch.setattr(attention, "sdpa_attention", lambda *a: chosen.append("sdpa") or sdpa_attention(*a))
    auto_attention(q, k, v, mask, causal)  # bf16 on the CPU, few keys
    auto_attention(q.float(), k.float(), v.float(), mask, causal)  # float32
    long_k = torch.zeros(3, 2, EAGER_MAX_KEYS + 1, 8, dtype=torch.bfloat16)
    auto_attention(q, long_k, long_k, None, False)  # too many keys to store the probabilities
    assert chosen == ["eager", "sdpa", "sdpa"]


def test_unknown_backend_is_refused_with_the_available_ones() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash9'; available: auto, eager, math, sdpa, triton"):
        set_attention_backend(Attention(8, 2), "flash9")


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu", "relu"])
def test_mlp_recomputing_its_activation_matches_plain_autograd(activation: str) -> None:
    from vlframe.nn import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 48, activation)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = mlp(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    plain = mlp.fc2(mlp.act(mlp.fc1(x)))  # the same layers through ordinary autograd
    expected = torch.autograd.grad(plain.square().sum(), [x, *mlp.parameters()])
    torch.testing.assert_close(out, plain)
    for got, want in zip(grads, expected):
        assert_close(got, want, depth="backward")


def test_blocks_with_fused_norms_match_plain_autograd() -> None:
    """The fused pre-norm path (recomputed in backward) gives plain autograd's values and gradients."""
    from vlframe.nn import Block

    torch.manual_seed(0)
    block = Block(16, 4, 32, causal=True, cross_dim=24)
    x = torch.randn(2, 5, 16, requires_grad=True)
    ctx = torch.randn(2, 7, 24, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    out = block(x, mask, ctx)
    grads = torch.autograd.grad(out.square().sum(), [x, ctx, *block.parameters()])

    def plain(x, ctx):  # the same block, written with plain modules only
        h = x + block.attn(block.norm1(x), key_mask=mask)
        h = h + block.cross(block.norm_cross(h), block.norm_context(ctx))
        return h + block.mlp.fc2(block.mlp.act(block.mlp.fc1(block.norm2(h))))

    with torch.autocast("cpu", enabled=False):
        reference = plain(x, ctx)
    expected = torch.autograd.grad(reference.square().sum(), [x, ctx, *block.parameters()])
    assert_close(out, reference, depth="layer")
    for got, want in zip(grads, expected):
        assert_close(got, want, depth="backward")


def test_fused_paths_follow_autocast_like_plain_modules() -> None:
    """Under bf16 autocast the fused block computes what plain modules under autocast compute."""
    from vlframe.nn import Block

    torch.manual_seed(0)
    block = Block(32, 4, 64)
    x = torch.randn(2, 6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
        with torch.no_grad():  # the no-grad path is the plain modules
            plain = block(x)
    assert out.dtype == plain.dtype
    assert_close(out, plain, dtype=torch.bfloat16, depth="layer")
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in block.parameters())


def test_auto_says_once_why_it_did_not_use_triton() -> None:
    import warnings

    from vlframe.nn import attention

    attention._SAID.discard("a reason for this test")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attention._fall_back_once("a reason for this test")
        attention._fall_back_once("a reason for this test")
    assert [str(w.message) for w in caught] == ["attention backend auto: using sdpa, not triton: a reason for this test"]
    q = torch.zeros(1, 1, 4, 8, dtype=torch.float64)  # float64 on the CPU: two reasons, device first
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    why = attention.triton_unsupported(q, q, q)
    assert why.startswith("dtype torch.float64" if interpreted else "tensors on cpu, not CUDA"), why

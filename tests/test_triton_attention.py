"""The Triton attention kernels against a float64 reference, forward and backward.

On a machine without a GPU the kernels run in Triton's interpreter, which must be switched on
before Python starts: `scripts/test.sh` (and so CI) sets TRITON_INTERPRET=1. Shapes are tiny
(the interpreter is ~1000x slower than torch) and ragged: lengths that are not multiples of the
16-wide blocks, head dims that are not powers of two.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from numerics import assert_all_close, assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (INTERPRET or GPU),
    reason="needs a CUDA GPU or TRITON_INTERPRET=1 set before Python starts (bash scripts/test.sh sets it)",
)
DEVICE = "cuda" if GPU and not INTERPRET else "cpu"


def reference(q, k, v, key_mask, causal):
    """Float64 attention written out: scores, the mask, softmax over the visible keys."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(q.shape[0], 1, lq, lk, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    empty = ~allowed.any(dim=-1, keepdim=True)  # rows with no visible key give zeros
    weights = torch.softmax(scores.masked_fill(~(allowed | empty), float("-inf")), dim=-1)
    return (weights @ v).masked_fill(empty, 0.0)


CASES = {
    # name: (lq, lk, head dim, causal, key lengths per example or None)
    "image_self": (13, 13, 32, False, None),
    "image_self_hd128": (17, 17, 128, False, None),
    "self_padded_hd64": (19, 19, 64, False, [19, 7]),
    "causal_text_padded": (21, 21, 32, True, [21, 9]),
    "cross_text_to_image_hd80": (11, 37, 80, False, [37, 20]),
    "pool_one_query_hd96": (1, 23, 96, False, None),
    "pool_many_queries": (20, 23, 32, False, [23, 5]),
    "causal_fewer_queries": (5, 12, 32, True, None),
    "no_visible_key": (6, 9, 32, False, [9, 0]),
}


def _inputs(lq, lk, d, lengths, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, d, generator=g) for n in (lq, lk, lk))
    mask = None
    if lengths is not None:
        mask = torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]
        mask = mask.to(DEVICE)
    q, k, v = (t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v))
    return q, k, v, mask


def _check(case: str, dtype: torch.dtype) -> None:
    from vlframe.nn.triton_attention import triton_attention

    lq, lk, d, causal, lengths = CASES[case]
    q, k, v, mask = _inputs(lq, lk, d, lengths, dtype)
    grad_out = torch.randn(2, 3, lq, d, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out = triton_attention(q, k, v, mask, causal)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want_out = reference(*leaves, mask, causal)
    want = torch.autograd.grad(want_out, leaves, grad_out.double())
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, want_out, dtype=dtype, depth="layer", what="out")
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype=dtype, depth="backward", what=f"d{name}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_forward_and_gradients_match_the_reference(case: str) -> None:
    _check(case, torch.float32)


@pytest.mark.parametrize("case", ["causal_text_padded", "cross_text_to_image_hd80", "pool_one_query_hd96"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs_accumulate_in_float32(case: str, dtype: torch.dtype) -> None:
    _check(case, dtype)


def test_rows_without_a_visible_key_give_zeros_and_zero_gradients() -> None:
    from vlframe.nn.triton_attention import triton_attention

    q, k, v, mask = _inputs(6, 9, 32, [9, 0], torch.float32)
    out = triton_attention(q, k, v, mask, False)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    assert torch.equal(k.grad[1], torch.zeros_like(k.grad[1])) and torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))


def test_any_batch_head_sequence_strides() -> None:
    from vlframe.nn.triton_attention import triton_attention

    g = torch.Generator().manual_seed(3)
    # (B, L, 3, H, D) as a fused QKV projection lays it out, viewed as (B, H, L, D) without copying.
    qkv = torch.randn(2, 18, 3, 2, 32, generator=g).to(DEVICE).requires_grad_(True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous() and q.stride(-1) == 1
    mask = (torch.arange(18)[None, :] < torch.tensor([[18], [11]])).to(DEVICE)
    out = triton_attention(q, k, v, mask, True)
    got = torch.autograd.grad(out.square().sum(), qkv)[0]
    leaf = qkv.detach().double().requires_grad_(True)
    want_out = reference(*leaf.permute(2, 0, 3, 1, 4), mask, True)
    want = torch.autograd.grad(want_out.square().sum(), leaf)[0]
    assert_close(out, want_out, dtype=torch.float32, depth="layer")
    assert_close(got, want, dtype=torch.float32, depth="backward")


def test_a_coca_training_step_with_the_triton_backend_matches_sdpa(registry, tmp_path) -> None:
    from training_configs import TINY, micro
    from vlframe import build_model, set_attention_backend

    overrides = micro(tmp_path, **{"model.caption_pooler.n_query": 4, "model.image_encoder.image_size": 32,
                                   "data.train.image_size": 48})
    overrides = {k: v for k, v in overrides.items() if k.startswith("model.")}
    torch.manual_seed(0)
    model = build_model(TINY, overrides, registry=registry).to(DEVICE)
    images = torch.randn(3, 3, 32, 32, device=DEVICE)
    text = torch.tensor([[1, 40, 41, 42, 43, 2, 0, 0], [1, 50, 51, 2, 0, 0, 0, 0], [1, 60, 61, 62, 63, 64, 65, 2]],
                        device=DEVICE)
    results = {}
    for backend in ("sdpa", "triton"):
        set_attention_backend(model, backend)
        model.zero_grad()
        out = model(images, text)
        out.loss.backward()
        results[backend] = (out.losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (sdpa_losses, sdpa_grads), (triton_losses, triton_grads) = results["sdpa"], results["triton"]
    for name in sdpa_losses:
        assert_close(triton_losses[name], sdpa_losses[name], what=name)
    assert_all_close(triton_grads, sdpa_grads)

"""How close two computations of the same values must be, said once: a tolerance derived from the
dtype and the magnitude of what is compared, never a fixed absolute number.

Two computations of the same values (cached and uncached decoding, eager and compiled, one rank
and two, vlframe's model and open_clip's, the same kernel on AVX2, AVX-512 or AMX) differ by
rounding alone. Each floating-point operation rounds to half a unit in the last place, relative
to the size of its operands; a sum of many terms carries the roundings of its terms, and
different kernels sum in different orders (blocking, vector width, fused multiply-add). So a
difference is measured against the *magnitude* of what was computed (the largest |value| of the
reference: the scale its terms were summed at, which keeps near-zero entries from demanding
relative precision they never had), in units of the dtype's epsilon. The gradients of one backward
share one scale, that of the largest among them (:func:`assert_all_close`): a gradient that sums
to nearly zero (a bias whose contributions cancel) was summed from terms of that scale.

    |actual - expected| <= (4 * eps(dtype) + ULPS[depth] * eps(float32)) * magnitude

``4 * eps(dtype)``: rounding the inputs and the result to ``dtype`` (what dominates for bfloat16,
whose arithmetic accumulates in float32); ``ULPS[depth] * eps(float32)``: the float32 roundings a
computation of that depth accumulates, a budget that grows with the chain of reductions between
inputs and result (the ulps of each depth are below). Differences from a real fault (a wrong
weight, a dropped mask, a stale cache entry) are of the order of the values themselves, far above
any of these budgets.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: Float32 ulps (of the magnitude) each depth of computation may accumulate.
ULPS = {
    "op": 4,  # one operation, or an exact rearrangement of the same arithmetic
    "layer": 64,  # one layer: a matmul, an attention, a norm
    "model": 256,  # a forward through a small model (a few blocks)
    "backward": 1024,  # a forward and a backward: gradients
    "steps": 16384,  # a few optimiser steps, whose updates carry the rounding of every step before
}


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def magnitude(values: torch.Tensor | float) -> float:
    """The largest |value| (0 for nothing)."""
    values = torch.as_tensor(values).detach()
    return float(values.abs().max()) if values.numel() else 0.0


def tolerance(expected: torch.Tensor | float, *, dtype: torch.dtype = torch.float32, depth: str = "model",
              scale: float | None = None) -> float:
    """The largest difference from ``expected`` that rounding explains (see the module's text);
    ``scale``: the magnitude its terms were summed at, when larger than its own."""
    size = max(magnitude(expected), scale or 0.0, torch.finfo(torch.float32).tiny)
    return (4 * eps(dtype) + ULPS[depth] * eps(torch.float32)) * size


def assert_close(actual: torch.Tensor | float, expected: torch.Tensor | float, *, dtype: torch.dtype | None = None,
                 depth: str = "model", what: str = "", printed: float = 0.0, scale: float | None = None) -> None:
    """``actual`` equals ``expected`` up to :func:`tolerance` (``dtype``: the lower precision the values
    were computed in; default the lower of the two tensors' float dtypes). ``printed``: the values were
    read from text printed to that resolution (``1e-3`` for three decimals), each rounded by half of it."""
    a, b = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    if dtype is None:
        dtype = max((t.dtype for t in (a, b) if t.is_floating_point()), key=eps, default=torch.float32)
    limit = tolerance(b, dtype=dtype, depth=depth, scale=scale) + printed
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {tuple(a.shape)} and {tuple(b.shape)}")
    diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    assert diff <= limit, (f"{what + ': ' if what else ''}max |difference| {diff:.3g} > {limit:.3g} "
                           f"({depth} depth in {dtype}, magnitude {max(magnitude(b), scale or 0.0):.3g})")


def assert_all_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                     depth: str = "backward", what: str = "", dtype: torch.dtype | None = None) -> None:
    """Every tensor of ``actual`` equals ``expected``'s of the same name, all measured against the
    largest magnitude among them (the gradients of one backward: their shared scale)."""
    assert actual.keys() == expected.keys(), (what, sorted(set(actual) ^ set(expected)))
    scale = max((magnitude(t) for t in expected.values()), default=0.0)
    for name in expected:
        assert_close(actual[name], expected[name], depth=depth, dtype=dtype, scale=scale,
                     what=f"{what + ': ' if what else ''}{name}")


def beyond_chance(chance: float, n: int, p: float = 1e-3) -> float:
    """The rate (in percent) a model that learnt nothing exceeds with probability below ``p``: the
    binomial quantile of ``n`` trials at ``chance``. What a trained model must beat is that, not a
    figure one machine's training reached: rounding on another CPU moves what is learnt, never the
    chance level."""
    from scipy.stats import binom

    return 100.0 * float(binom.ppf(1 - p, n, chance)) / n


__all__ = ["ULPS", "assert_all_close", "assert_close", "beyond_chance", "eps", "magnitude", "tolerance"]

"""Attention TFLOP/s on the GPU at CoCa's shapes: vlframe's Triton kernels against torch SDPA.

    python3 benchmarks/attention.py [--sizes base large] [--batch 32] [--quick]

Cases (bf16, the batch and heads of coca_base (12 x 64) and coca_large (16 x 64)): image
self-attention at 197, 257 and 577 tokens; padded causal text at 76 tokens (key lengths drawn
between 8 and 76, as captions are); cross-attention from 76 text tokens to 256 image tokens;
attentional pooling with 256 and with 1 query over 256 image tokens. Each case is timed forward
and forward+backward for the Triton backend, for SDPA as torch picks (vlframe's ``sdpa``
backend: a boolean mask where there is padding), and for each SDPA kernel torch offers for the
case (flash, efficient, cudnn, math). FLOPs count the two matmuls (4 * B * H * Lq * Lk * D
forward, backward 2.5x that) over the visible (query, key) pairs only, so a causal case counts
about half. The ratio is Triton against SDPA's default choice.

Needs a CUDA GPU; imports only torch, triton and ``vlframe.nn`` (no pydantic or MLflow).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlframe.nn.attention import sdpa_attention  # noqa: E402
from vlframe.nn.triton_attention import triton_attention  # noqa: E402

SIZES = {"base": 12, "large": 16}  # heads of width 64
HEAD_DIM = 64


def cases(heads: int, batch: int, device: str) -> list[tuple[str, dict]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    text_lengths = torch.randint(8, 77, (batch,), generator=g)
    text_mask = (torch.arange(76)[None, :] < text_lengths[:, None]).to(device)
    out = [(f"image self {n}", {"lq": n, "lk": n, "causal": False, "mask": None}) for n in (197, 257, 577)]
    out += [
        ("padded causal text 76", {"lq": 76, "lk": 76, "causal": True, "mask": text_mask}),
        ("cross 76 x 256", {"lq": 76, "lk": 256, "causal": False, "mask": None}),
        ("pooling 256 x 256", {"lq": 256, "lk": 256, "causal": False, "mask": None}),
        ("pooling 1 x 256", {"lq": 1, "lk": 256, "causal": False, "mask": None}),
    ]
    return out


def visible_pairs(lq: int, lk: int, causal: bool, mask: torch.Tensor | None, batch: int) -> float:
    allowed = torch.ones(batch, lq, lk, dtype=torch.bool)
    if mask is not None:
        allowed &= mask.cpu()[:, None, :]
    if causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return float(allowed.sum())


def sdpa_kernel_fns() -> dict:
    """SDPA forced onto each kernel torch has (a case a kernel cannot take reports n/a)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        kernels["cudnn"] = SDPBackend.CUDNN_ATTENTION

    def forced(backend):
        def fn(q, k, v, mask, causal):
            with sdpa_kernel(backend):
                return sdpa_attention(q, k, v, mask, causal)
        return fn

    return {f"sdpa[{name}]": forced(b) for name, b in kernels.items()}


def bench(fn, q, k, v, mask, causal, backward: bool) -> float:
    """Milliseconds per call (triton.testing.do_bench: warm-up, then the median)."""
    import triton.testing

    grad = torch.randn_like(q)

    def run():
        if not backward:
            with torch.no_grad():  # no autograd graph: the kernels alone
                fn(q, k, v, mask, causal)
            return
        out = fn(q, k, v, mask, causal)
        torch.autograd.grad(out, (q, k, v), grad)

    return triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="Triton and default SDPA only (no forced kernels)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (run scripts/gpu_check.sh on one)")
        return 1
    import triton

    device = "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; bf16, "
          f"batch {args.batch}, head dim {HEAD_DIM}; TFLOP/s over visible pairs (fwd | fwd+bwd)")
    others = {} if args.quick else sdpa_kernel_fns()
    for size in args.sizes:
        heads = SIZES[size]
        print(f"\ncoca_{size}: {heads} heads")
        print(f"{'case':24s} {'backend':16s} {'fwd':>8s} {'fwd+bwd':>8s}   triton / sdpa")
        for name, case in cases(heads, args.batch, device):
            lq, lk = case["lq"], case["lk"]
            q = torch.randn(args.batch, heads, lq, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(args.batch, heads, lk, HEAD_DIM, device=device, dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            flops = 4.0 * heads * HEAD_DIM * visible_pairs(lq, lk, case["causal"], case["mask"], args.batch)
            results = {}
            for backend, fn in {"triton": triton_attention, "sdpa": sdpa_attention, **others}.items():
                try:
                    fwd = bench(fn, q, k, v, case["mask"], case["causal"], backward=False)
                    both = bench(fn, q, k, v, case["mask"], case["causal"], backward=True)
                except Exception as exc:  # noqa: BLE001 - a kernel that cannot take (or compile) this case
                    print(f"{name:24s} {backend:16s} {'n/a':>8s} {'n/a':>8s}   ({str(exc).splitlines()[0][:60]})")
                    continue
                results[backend] = (flops / fwd / 1e9, 3.5 * flops / both / 1e9)
                ratio = ""
                if backend == "sdpa" and "triton" in results:
                    t, s = results["triton"], results["sdpa"]
                    goal = ">= 1.5x" if case["mask"] is not None else ">= 1.0x"
                    ratio = f"{t[0] / s[0]:.2f}x | {t[1] / s[1]:.2f}x (goal fwd+bwd {goal})"
                print(f"{name:24s} {backend:16s} {results[backend][0]:8.1f} {results[backend][1]:8.1f}   {ratio}")
            del q, k, v
    return 0


if __name__ == "__main__":
    sys.exit(main())

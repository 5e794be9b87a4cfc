"""Greedy captioning speed at the coca_tiny shape, against open_clip's CoCa ``generate``.

    .venv/bin/python benchmarks/generate.py [--images 8] [--tokens 20] [--repeats 5] [--threads 2]

Both models are randomly initialised at the same shape (see benchmarks/train_throughput.py),
eager, in one process with the same thread count, in float32 and in bf16 autocast (which
`vlframe caption` and `vlframe eval` pick where the CPU computes bf16 natively), and generate exactly ``--tokens``
tokens per image after the start token (EOS is held back until then): vlframe with
``min_length = max_length = tokens``; open_clip (``generation_type="top_k", top_k=1``, its
greedy) with ``seq_len = tokens + 1`` and ``min_seq_len = tokens``. open_clip's generate needs
``transformers < 4.56``. vlframe is also timed without its key/value cache, to show what the
cache buys, and with its compiled decode step over a static cache (``compile: true``; the first
call's compilation is reported apart; ``--no-compile`` skips it). Figures are the median of ``--repeats`` runs after one warm-up.

The bound: with the cache, a decode step at batch 8 reads every decoder weight once and does
little arithmetic per byte, so it cannot be faster than (bytes of the weights a step's linear
layers read) / (memory bandwidth measured here, a large copy); the image side is arithmetic:
(its FLOPs, counted by torch's FlopCounterMode) / (the matmul rate measured here). Bound =
image side + tokens x step; the script prints it and vlframe's fraction of it.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import build_open_clip  # noqa: E402  (same shape as the training benchmark)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measured_bandwidth(size_bytes: int) -> float:
    """Bytes per second (read + write) of copying a tensor of ``size_bytes``, the best of five."""
    src = torch.randn(max(1, size_bytes // 4))
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_time(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() * 4 / best


def measured_flops(dtype: torch.dtype) -> float:
    """FLOP/s of a 1024^3 matmul, the best of five."""
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    return 2 * 1024**3 / min(_time(lambda: a @ b) for _ in range(5))


def _time(fn) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def step_weight_bytes(model, images: torch.Tensor) -> tuple[int, float]:
    """(bytes of weights the linear layers of one cached decode step read, FLOPs of the image side)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlframe.nn.cache import KVCache

    with FlopCounterMode(display=False) as counter:  # (its module tracker needs autograd on)
        model.caption_context(images)
    image_flops = counter.get_total_flops()
    with torch.no_grad():
        context = model.caption_context(images)
        cache = KVCache()
        prompt = torch.ones(images.shape[0], 1, dtype=torch.long)
        model.caption_logits(prompt, context, cache)  # the prompt; projects the image context once
        seen: dict[int, int] = {}

        def hook(module, inputs, output):
            seen[id(module)] = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            model.caption_logits(prompt, context, cache)  # one decode step
        finally:
            for handle in handles:
                handle.remove()
    return sum(seen.values()), float(image_flops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the compiled decode step (its compilation takes tens of seconds)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import vlframe
    from vlframe.inference.generation import generate
    from vlframe.runtime.precision import resolve_precision

    images = torch.randn(args.images, 3, 128, 128)
    model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml").eval()
    from machine import describe, precisions

    default = resolve_precision("auto", torch.device("cpu"))
    machine, native = describe(args.threads)
    print(f"greedy captioning, {args.images} images x {args.tokens} tokens, coca_tiny shape, {args.threads} threads, "
          f"eager; median of {args.repeats}; `vlframe caption` here uses {default}")
    print(machine)

    open_clip_model, why_not = None, ""
    try:
        import transformers

        open_clip_model = build_open_clip()[0].eval()
    except ImportError as exc:
        why_not = f"{exc.name} is not installed (pip install open_clip_torch 'transformers<4.56')"

    weights, image_flops = step_weight_bytes(model, images)
    # The weights a step reads stay in the caches between steps when they fit: the bandwidth that
    # bounds a step is the one measured at their size; a main-memory copy is shown beside it.
    bandwidth, dram = measured_bandwidth(weights), measured_bandwidth(1 << 30)
    print(f"bound inputs: a decode step's linear layers read {weights / 2**20:.1f} MiB of float32 weights; copy "
          f"bandwidth at that size {bandwidth / 1e9:.1f} GB/s (1 GiB: {dram / 1e9:.1f} GB/s); the image side is "
          f"{image_flops / 1e9:.2f} GFLOP")
    for mode in precisions(args.precision, native):
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()

        def run_vlframe(use_cache: bool, compile: bool = False):
            with autocast():
                out = generate(model, images, bos_id=1, eos_id=2, pad_id=0, min_length=args.tokens,
                               max_length=args.tokens, use_cache=use_cache, compile=compile)
            assert out.tokens.shape[-1] == args.tokens
            return out

        cached = timed(lambda: run_vlframe(True), args.repeats)
        compiled = None
        if args.compile:
            began = time.perf_counter()
            same = torch.equal(run_vlframe(True, True).tokens, run_vlframe(True).tokens)
            first = time.perf_counter() - began
            compiled = timed(lambda: run_vlframe(True, True), args.repeats)
            print(f"{mode} vlframe (compiled decode step, static cache) {compiled:.3f} s   "
                  f"{cached / compiled:.2f}x the eager cached time; first call with compilation {first:.1f} s; "
                  f"tokens {'equal to' if same else 'DIFFERENT from'} eager")
        uncached = timed(lambda: run_vlframe(False), args.repeats)
        print(f"{mode} vlframe (key/value cache)  {cached:.3f} s")
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        rate = measured_flops(dtype)
        step_bytes = weights / (2 if mode == "bf16" else 1)  # autocast reads bf16 copies of the weights
        bound = image_flops / rate + args.tokens * step_bytes / bandwidth
        print(f"{mode} bound: image side {image_flops / rate * 1e3:.1f} ms at {rate / 1e9:.0f} GFLOP/s + {args.tokens} "
              f"steps x {step_bytes / bandwidth * 1e3:.2f} ms = {bound:.3f} s; vlframe takes {cached / bound:.2f}x the "
              f"bound ({bound / cached:.0%} of it)")
        print(f"{mode} vlframe (no cache)         {uncached:.3f} s   cache speed-up {uncached / cached:.1f}x")
        if open_clip_model is None:
            print(f"{mode} open_clip comparison skipped: {why_not}")
            continue

        def run_open_clip():
            with torch.no_grad(), autocast():
                out = open_clip_model.generate(images, seq_len=args.tokens + 1, generation_type="top_k", top_k=1,
                                               sot_token_id=1, eos_token_id=2, pad_token_id=0,
                                               min_seq_len=args.tokens)
            assert out.shape[-1] == args.tokens + 1
            return out

        try:
            reference = timed(run_open_clip, args.repeats)
        except Exception as exc:  # noqa: BLE001 - its generate breaks with newer transformers
            print(f"{mode} open_clip generate failed (transformers {transformers.__version__}; it needs < 4.56): "
                  f"{type(exc).__name__}: {exc}")
            continue
        print(f"{mode} open_clip generate         {reference:.3f} s   (transformers {transformers.__version__})")
        print(f"{mode} vlframe / open_clip: {reference / cached:.1f}x faster (goal >= 5x)")
        if compiled is not None:
            print(f"{mode} vlframe compiled / open_clip: {reference / compiled:.1f}x faster (goal >= 5x); "
                  f"{bound / compiled:.0%} of the bound")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Greedy captioning speed at the coca_tiny shape, against open_clip's CoCa ``generate``.

    .venv/bin/python benchmarks/generate.py [--images 8] [--tokens 20] [--repeats 5] [--threads 2]

Both models are randomly initialised at the same shape (see benchmarks/train_throughput.py),
eager, in one process with the same thread count, in float32 and in bf16 autocast (which
`vlframe caption` and `vlframe eval` pick where the CPU computes bf16 natively), and generate exactly ``--tokens``
tokens per image after the start token (EOS is held back until then): vlframe with
``min_length = max_length = tokens``; open_clip (``generation_type="top_k", top_k=1``, its
greedy) with ``seq_len = tokens + 1`` and ``min_seq_len = tokens``. open_clip's generate needs
``transformers < 4.56``. vlframe is also timed without its key/value cache, to show what the
cache buys. Figures are the median of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import vlframe
    from vlframe.inference.generation import generate
    from vlframe.runtime.precision import resolve_precision

    images = torch.randn(args.images, 3, 128, 128)
    model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml").eval()
    default = resolve_precision("auto", torch.device("cpu"))
    print(f"greedy captioning, {args.images} images x {args.tokens} tokens, coca_tiny shape, {args.threads} threads, "
          f"eager; median of {args.repeats}; `vlframe caption` here uses {default}")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, python {platform.python_version()}")

    open_clip_model, why_not = None, ""
    try:
        import transformers

        open_clip_model = build_open_clip()[0].eval()
    except ImportError as exc:
        why_not = f"{exc.name} is not installed (pip install open_clip_torch 'transformers<4.56')"

    for mode in ("fp32", "bf16"):
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()

        def run_vlframe(use_cache: bool):
            with autocast():
                out = generate(model, images, bos_id=1, eos_id=2, pad_id=0, min_length=args.tokens,
                               max_length=args.tokens, use_cache=use_cache)
            assert out.tokens.shape[-1] == args.tokens
            return out

        cached = timed(lambda: run_vlframe(True), args.repeats)
        uncached = timed(lambda: run_vlframe(False), args.repeats)
        print(f"{mode} vlframe (key/value cache)  {cached:.3f} s")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-step throughput and peak memory of coca_tiny on the CPU, against open_clip's CoCa.

    .venv/bin/python benchmarks/train_throughput.py [--steps 10] [--batch 32] [--threads 2]

Each model is measured in its own fresh process (so peak memory is its own): forward, backward
and an AdamW step on a random batch (images 128 px, captions of 32 tokens), after warm-up
steps. open_clip (pip install open_clip_torch) is built at the same shape: ViT 256 x 4 layers,
patch 16, text 2 unimodal + 2 multimodal layers of width 256, 4 heads, context 32, vocabulary
8192, 64 pooler queries, embed 256, caption/contrastive loss weights 2/1. Both run in eager
mode (no torch.compile), float32, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_vlframe():
    import vlframe

    model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml")

    def step(images, text):
        return model(images, text).loss

    return model, step


def build_open_clip():
    from open_clip.coca_model import CoCa, MultimodalCfg
    from open_clip.loss import CoCaLoss
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = CoCa(
        embed_dim=256,
        multimodal_cfg=MultimodalCfg(width=256, heads=4, layers=2, context_length=32, vocab_size=8192,
                                     attn_pooler_heads=4),
        text_cfg=CLIPTextCfg(context_length=32, vocab_size=8192, width=256, heads=4, layers=2, embed_cls=True,
                             output_tokens=True),
        vision_cfg=CLIPVisionCfg(image_size=128, patch_size=16, width=256, layers=4, head_width=64,
                                 attentional_pool=True, attn_pooler_queries=64, attn_pooler_heads=4,
                                 output_tokens=True),
    )
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)

    def step(images, text):
        out = model(images, text)
        clip_loss, caption_loss = loss_fn(**out)
        return clip_loss + caption_loss

    return model, step


def measure(which: str, steps: int, warmup: int, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, step = build_vlframe() if which == "vlframe" else build_open_clip()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    images = torch.randn(batch, 3, 128, 128)
    text = torch.randint(3, 8192, (batch, 32))
    text[:, 0], text[:, -1] = 1, 2
    before = current_rss_mib()
    times = []
    for i in range(warmup + steps):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = step(images, text)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - began)
    times.sort()
    median = times[len(times) // 2]
    return {
        "model": which,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "s_per_step": median,
        "images_per_s": batch / median,
        "peak_rss_mib": rss_peak_mib(),
        "step_peak_mib": rss_peak_mib() - before,
        "loss": float(loss),
    }


def run_child(which: str, args: argparse.Namespace) -> dict | None:
    cmd = [sys.executable, __file__, "--child", which, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        print(f"{which}: failed: {tail[0]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=("vlframe", "open_clip"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch, args.threads)))
        return

    import torch

    print(f"coca_tiny training step, batch {args.batch}, {args.threads} threads, float32 eager; "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, python {platform.python_version()}")
    results = {}
    try:
        import open_clip  # noqa: F401

        have_open_clip = True
    except ImportError:
        have_open_clip = False
        print("open_clip is not installed (pip install open_clip_torch): measuring vlframe alone")
    for which in ("vlframe", "open_clip") if have_open_clip else ("vlframe",):
        res = run_child(which, args)
        if res is None:
            continue
        results[which] = res
        print(f"{which:10s} {res['params_m']:6.2f}M params  {res['s_per_step']:.3f} s/step  "
              f"{res['images_per_s']:6.1f} images/s  peak RSS {res['peak_rss_mib']:7.1f} MiB  "
              f"(step peak above start {res['step_peak_mib']:6.1f} MiB)")
    if "open_clip" in results and "vlframe" in results:
        v, o = results["vlframe"], results["open_clip"]
        print(f"vlframe / open_clip: throughput {v['images_per_s'] / o['images_per_s']:.2f}x (goal >= 1.2x), "
              f"peak RSS {v['peak_rss_mib'] / o['peak_rss_mib']:.2f}x, "
              f"step peak {v['step_peak_mib'] / o['step_peak_mib']:.2f}x (goal <= 0.8x)")


if __name__ == "__main__":
    main()

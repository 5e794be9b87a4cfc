"""Training-step throughput and peak memory of coca_tiny on the CPU, against open_clip's CoCa.

    .venv/bin/python benchmarks/train_throughput.py [--steps 10] [--batch 32] [--threads 2]
        [--precision both|fp32|bf16] [--recompute auto|none|all|norm,activation,...] [--grid]
        [--text random|flickr8k]

Each model is measured in its own fresh process: forward, backward and a (fused) AdamW step on
a random batch (images 128 px, captions of 32 tokens), after warm-up
steps. open_clip (pip install open_clip_torch) is built at the same shape: ViT 256 x 4 layers,
patch 16, text 2 unimodal + 2 multimodal layers of width 256, 4 heads, context 32, vocabulary
8192, 64 pooler queries, embed 256, caption/contrastive loss weights 2/1. Both run in eager
mode (no torch.compile), in float32 and in bf16 autocast (which `vlframe train` picks where the
CPU computes bf16 natively), with the same thread count. Memory is the step's peak resident
memory above what stays resident between steps (weights, optimiser state, framework): the
activations, gradients and temporaries a step needs.

``--recompute`` chooses what vlframe recomputes in backward (``train.recompute``; default
``auto``, the per-precision default); ``--grid`` measures vlframe with every choice, the table
behind those defaults. bf16 runs only where the CPU computes it natively (it says so otherwise).

``--text`` chooses the captions. ``random`` (the default): every caption 32 random tokens, so
both models do exactly the same work. ``flickr8k``: real captions (../shared/data/flickr8k,
tokenized by a SentencePiece unigram vocabulary of 8192 trained on its training captions, as
configs/flickr8k.yaml does), a different random batch of 32 every step (the warm-up passes once over
the timed batches, so that no caption length is met for the first time while timed), each model fed the way
its own training feeds it: vlframe's batches padded to their longest caption, open_clip's to
its context length (its tokenizers always pad to it; padding is masked out of its loss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def build_vlframe(recompute: str = "auto"):
    import vlframe
    from vlframe.nn.recompute import set_recompute

    # auto: the default of the precision the step runs in (decided under autocast, per step)
    set_recompute(None if recompute == "auto" else _parts(recompute))
    model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml")

    def step(images, text):
        return model(images, text).loss

    return model, step


def _parts(setting: str) -> list[str]:
    from vlframe.nn.recompute import PARTS

    if setting == "all":
        return list(PARTS)
    return [] if setting == "none" else setting.split(",")


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


class PeakRSS:
    """Samples this process's resident memory every half millisecond; ``peak`` is the highest seen.

    The parent starts this process with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns
    large freed blocks to the system at once: resident memory then follows the live tensors
    instead of the allocator's high-water mark, and a step's peak is visible.
    """

    def __init__(self) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.0005)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def caption_batches(count: int, batch: int) -> list[list[list[int]]]:
    """``count`` batches of ``batch`` real Flickr8k captions as token ids (BOS ... EOS, at most 32)."""
    import random
    import tempfile

    from vlframe_builtins.tokenizers.sentencepiece import SentencePieceConfig, SentencePieceTokenizer

    rows = [json.loads(line) for line in (FLICKR8K / "train.jsonl").read_text().splitlines() if line.strip()]
    captions = [c for row in rows for c in row["captions"]]
    tokenizer = SentencePieceTokenizer(SentencePieceConfig(type="sentencepiece", model_type="unigram"), vocab_size=8192)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.train(captions, Path(tmp))
    draw = random.Random(0)
    out = []
    for _ in range(count):
        ids, _mask = tokenizer.encode(draw.sample(captions, batch), 32)
        out.append([[int(t) for t in row if t != tokenizer.pad_id] for row in ids])
    return out


def padded(rows: list[list[int]], length: int | None):
    """Rows padded with 0 to ``length`` (None: to the longest row)."""
    import torch

    length = length or max(len(r) for r in rows)
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row)
    return out


def measure(which: str, steps: int, warmup: int, batch: int, threads: int, precision: str,
            recompute: str = "auto", text_file: str | None = None) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, step = build_vlframe(recompute) if which == "vlframe" else build_open_clip()
    model.train()
    # vlframe's trainer uses AdamW with weight decay; fused (one kernel per step) for both models.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    images = torch.randn(batch, 3, 128, 128)
    if text_file is None:
        text = torch.randint(3, 8192, (batch, 32))
        text[:, 0], text[:, -1] = 1, 2
        texts = [text] * (warmup + steps)
    else:  # vlframe: padded to the batch's longest caption; open_clip: to its context length
        texts = [padded(rows, None if which == "vlframe" else 32) for rows in json.loads(Path(text_file).read_text())]
    tokens = sum(int((t != 0).sum()) for t in texts[warmup:]) / steps
    positions = sum(t.numel() for t in texts[warmup:]) / steps
    # Real captions: the warm-up also passes once over the timed batches, so that every caption
    # length they hold has been seen (oneDNN and the allocator keep per-shape state: a long run
    # sees every length within its first steps, and a first sighting is not a step's cost).
    warm = texts[:warmup] + (texts[warmup:] if text_file is not None else [])
    batches = iter(warm + texts[warmup:])

    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext())

    def one_step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = step(images, next(batches))
        loss.backward()
        optimizer.step()
        return float(loss)

    for _ in range(len(warm)):  # optimiser state exists from here on
        one_step()
    optimizer.zero_grad(set_to_none=True)
    resident = current_rss_mib()  # weights, optimiser state, framework
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            began = time.perf_counter()
            loss = one_step()
            times.append(time.perf_counter() - began)
    times.sort()
    median = times[len(times) // 2]
    return {
        "model": which,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "s_per_step": median,
        "images_per_s": batch / median,
        "resident_mib": resident,
        "step_peak_mib": rss.peak / 2**20 - resident,
        "loss": loss,
        "text_positions": positions / batch,
        "text_tokens": tokens / batch,
    }


def run_child(which: str, args: argparse.Namespace) -> dict | None:  # args.precision: one mode
    """Time in one fresh process (default allocator), measure memory in another.

    Returning freed memory to the system at once (for an honest peak) slows every allocation,
    so the two measurements never share a process.
    """
    cmd = [sys.executable, __file__, "--child", which, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--threads", str(args.threads), "--precision", args.precision,
           "--recompute", args.recompute, *(["--text-file", args.text_file] if args.text_file else [])]
    results = []
    for env in (dict(os.environ), dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            print(f"{which}: failed: {tail[0]}")
            return None
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    timed, memory = results
    return {**timed, "resident_mib": memory["resident_mib"], "step_peak_mib": memory["step_peak_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("both", "fp32", "bf16"), default="both",
                        help="bf16: autocast, which `vlframe train` uses where the CPU computes bf16 natively")
    parser.add_argument("--recompute", default="auto",
                        help="vlframe's train.recompute: auto, none, all, or parts joined by commas (norm,activation,caption_logits)")
    parser.add_argument("--grid", action="store_true", help="vlframe with every recompute choice, open_clip once")
    parser.add_argument("--text", choices=("random", "flickr8k"), default="random",
                        help="random: 32 random tokens per caption (equal work); flickr8k: real captions, each model "
                             "padding them as its training does")
    parser.add_argument("--child", choices=("vlframe", "open_clip"), help=argparse.SUPPRESS)
    parser.add_argument("--text-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch, args.threads, args.precision,
                                 args.recompute, args.text_file)))
        return
    if args.text == "flickr8k" and not (FLICKR8K / "train.jsonl").is_file():
        print(f"--text flickr8k: Flickr8k is not at {FLICKR8K}")
        sys.exit(1)

    import torch

    from machine import describe, precisions
    from vlframe.nn.recompute import DEFAULTS
    from vlframe.runtime.precision import resolve_precision

    trainer_mode = resolve_precision("auto", torch.device("cpu"))
    machine, native = describe(args.threads)
    print(f"coca_tiny training step, batch {args.batch}, {args.threads} threads, eager; "
          f"median of {args.steps} steps after {args.warmup} warm-up; `vlframe train` here uses {trainer_mode}")
    print(machine)
    text_file = None
    if args.text == "flickr8k":
        import tempfile

        import atexit
        import shutil

        folder = tempfile.mkdtemp(prefix="vlframe-captions-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the children have read it by then
        text_file = Path(folder) / "captions.json"
        text_file.write_text(json.dumps(caption_batches(args.warmup + args.steps, args.batch)))
        print(f"captions: real Flickr8k training captions, a new random batch every step; vlframe pads a batch to its "
              f"longest caption, open_clip to its context length 32")
    else:
        print("captions: 32 random tokens each (both models do the same work)")
    args.text_file = str(text_file) if text_file else None
    try:
        import open_clip  # noqa: F401

        models = ("vlframe", "open_clip")
    except ImportError:
        models = ("vlframe",)
        print("open_clip is not installed (pip install open_clip_torch): measuring vlframe alone")
    choices = ["none", "norm", "activation", "caption_logits", "norm,activation", "activation,caption_logits", "all"] if args.grid \
        else [args.recompute]
    for mode in precisions(args.precision, native):
        default = ",".join(sorted(DEFAULTS[mode])) or "none"
        reference = None
        if "open_clip" in models:
            reference = run_child("open_clip", argparse.Namespace(**{**vars(args), "precision": mode}))
            if reference is not None:
                _line(mode, "open_clip", reference)
        for choice in choices:
            res = run_child("vlframe", argparse.Namespace(**{**vars(args), "precision": mode, "recompute": choice}))
            if res is None:
                continue
            shown = default if choice == "auto" else choice
            label = f"vlframe [{shown}]" + (" (auto)" if shown == default else "")
            _line(mode, label, res)
            if reference is not None:
                print(f"{mode} {label} / open_clip: throughput {res['images_per_s'] / reference['images_per_s']:.2f}x "
                      f"(goal >= 1.2x), step peak memory {res['step_peak_mib'] / reference['step_peak_mib']:.2f}x "
                      "(goal <= 0.8x)")


def _line(mode: str, label: str, res: dict) -> None:
    print(f"{mode} {label:28s} {res['params_m']:6.2f}M params  {res['s_per_step']:.3f} s/step  "
          f"{res['images_per_s']:6.1f} images/s  step peak {res['step_peak_mib']:6.1f} MiB above "
          f"{res['resident_mib']:.0f} MiB resident; text {res['text_positions']:.1f} positions/caption "
          f"({res['text_tokens']:.1f} real)")


if __name__ == "__main__":
    main()

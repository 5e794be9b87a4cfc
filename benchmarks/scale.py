"""Scaling out on the CPU: FSDP2 against DDP, activation checkpointing, torch.compile, and the
captioning loss at a 64k vocabulary.

    .venv/bin/python benchmarks/scale.py [--part all | fsdp ac fits compile caption_loss] [--steps 2]

- fsdp: coca_base (389M parameters) on 2 gloo ranks (torchrun, one thread each), DDP against
  FSDP2 (train.parallel: fsdp): per rank, the memory resident between steps (weights, gradients,
  AdamW state) and the step's peak above it, and the step time.
- ac: activation checkpointing none / full / selective: coca_base under FSDP on 2 ranks, and
  coca_tiny in one process at batch 32 (where activations dominate the step's memory).
- compile: the coca_tiny training step, eager against compiled, vlframe (each block compiled,
  as train.compile does) and open_clip (torch.compile of the model) in the same run.
- caption_loss: vlframe's captioning loss (chunked, recomputed logits) against the plain
  ``cross_entropy(head(states))`` at coca_base's 64,000-token vocabulary: peak memory and time.

Every measurement runs in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed
memory goes back to the system at once, so resident memory follows the live tensors); peaks are
sampled every half millisecond. Times are the median of ``--steps`` steps after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import PeakRSS, build_open_clip, current_rss_mib  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_line() -> str:
    import torch

    from vlframe.runtime.precision import native_bf16

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native = native_bf16(torch.device("cpu"))
    return f"{model}, {os.cpu_count()} cores, bf16 {'native' if native else 'not native (emulated: skipped)'}; torch {torch.__version__}"


def _precisions() -> list[str]:
    import torch

    from vlframe.runtime.precision import native_bf16

    return ["fp32", "bf16"] if native_bf16(torch.device("cpu")) else ["fp32"]


# -- children ----------------------------------------------------------------------------------


def child_rank(strategy: str, ac: str, steps: int, batch: int) -> None:
    """One rank of coca_base under DDP or FSDP (the trainer's parallel strategy plugins); rank 0 prints
    a JSON line."""
    import torch

    from registry import Kind
    from vlframe.api import build_model
    from vlframe.config import files as configfile
    from vlframe.runtime import distributed
    from vlframe.runtime.blocks import prepare_blocks

    torch.set_num_threads(1)
    config, registry = configfile.load(ROOT / "configs" / "coca_base.yaml", [f"train.parallel={strategy}"])
    parallel = registry.catalog.build(Kind.PARALLEL, config.train.parallel)
    device = parallel.setup()
    world = distributed.world_size()
    before = current_rss_mib()
    model = parallel.parallelize(lambda dev: build_model(config, registry=registry, device=dev),
                                 lambda m: prepare_blocks(m, compile=False, activation_checkpointing=ac),
                                 device=device, seed=0, precision="fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    images = torch.randn(batch, 3, model.image_size, model.image_size)
    text = torch.randint(3, 64000, (batch, model.context_length))
    text[:, 0] = 1

    def forward_backward() -> None:
        loss = parallel.module(images, text).loss
        loss.backward()
        parallel.clip_grad_norm([p for p in model.parameters() if p.grad is not None], None)  # the reduction

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between real steps
        forward_backward()
        optimizer.step()

    one_step()  # optimiser state exists from here on
    resident = current_rss_mib() - before
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            began = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - began)
    peak = rss.peak / 2**20 - before - resident
    optimizer.zero_grad(set_to_none=False)
    with PeakRSS() as rss:  # forward and backward alone: activations, gathered units, reduce buffers
        forward_backward()
    fwd_bwd = rss.peak / 2**20 - before - resident
    # What the forward keeps for backward: the activations (and the root unit, kept gathered).
    optimizer.zero_grad(set_to_none=False)
    start = current_rss_mib()
    loss = parallel.module(images, text).loss
    kept = current_rss_mib() - start
    loss.backward()
    stats = torch.tensor([resident, peak, sorted(times)[len(times) // 2], fwd_bwd, kept])
    if world > 1:
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    if distributed.rank() == 0:
        print(json.dumps({"strategy": strategy, "ac": ac, "resident_mib": float(stats[0]), "peak_mib": float(stats[1]),
                          "s_per_step": float(stats[2]), "fwd_bwd_mib": float(stats[3]), "kept_mib": float(stats[4]),
                          "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))
    distributed.barrier()
    distributed.teardown()


def child_compile(which: str, compiled: bool, precision: str, steps: int, batch: int) -> None:
    import contextlib

    import torch

    torch.set_num_threads(2)
    torch.manual_seed(0)
    if which == "vlframe":
        import vlframe
        from vlframe.runtime.blocks import compile_blocks

        model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml")
        if compiled:
            compile_blocks(model)

        def step(images, text):
            return model(images, text).loss
    else:
        from open_clip.loss import CoCaLoss

        model, _ = build_open_clip()
        run = torch.compile(model) if compiled else model
        loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, pad_id=0)

        def step(images, text):
            clip_loss, caption_loss = loss_fn(**run(images, text))
            return clip_loss + caption_loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    images = torch.randn(batch, 3, 128, 128)
    text = torch.randint(3, 8192, (batch, 32))
    text[:, 0], text[:, -1] = 1, 2
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = step(images, text)
        loss.backward()
        optimizer.step()

    began = time.perf_counter()
    one_step()  # compiles here
    first = time.perf_counter() - began
    one_step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - began)
    print(json.dumps({"first_s": first, "s_per_step": sorted(times)[len(times) // 2]}))


def child_ac(ac: str, precision: str, steps: int, batch: int) -> None:
    """coca_tiny in one process (2 threads) with activation checkpointing ``ac``."""
    import contextlib

    import torch

    import vlframe
    from vlframe.runtime.blocks import checkpoint_blocks

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = vlframe.build_model(ROOT / "configs" / "coca_tiny.yaml")
    checkpoint_blocks(model, ac)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    images = torch.randn(batch, 3, 128, 128)
    text = torch.randint(3, 8192, (batch, 32))
    text[:, 0], text[:, -1] = 1, 2
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def one_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(images, text).loss
        loss.backward()
        optimizer.step()

    one_step()
    optimizer.zero_grad(set_to_none=True)
    resident = current_rss_mib()
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            began = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - began)
    print(json.dumps({"peak_mib": rss.peak / 2**20 - resident, "s_per_step": sorted(times)[len(times) // 2]}))


def child_caption_loss(chunked: bool, steps: int) -> None:
    import torch

    from vlframe_builtins.objectives import CaptioningConfig, CaptioningLoss

    torch.set_num_threads(2)
    batch, length, width, vocab = 32, 64, 768, 64000
    head = torch.nn.Linear(width, vocab, bias=False)
    states = torch.randn(batch, length, width, requires_grad=True)
    text = torch.randint(3, vocab, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    loss_fn = CaptioningLoss(CaptioningConfig(type="captioning", chunk_tokens=512 if chunked else None))

    def one() -> None:
        head.weight.grad, states.grad = None, None
        loss = loss_fn({"caption_states": states, "lm_head": head, "text": text, "text_mask": mask})
        loss.backward()

    one()
    head.weight.grad, states.grad = None, None
    resident = current_rss_mib()
    times = []
    with PeakRSS() as rss:
        for _ in range(steps):
            began = time.perf_counter()
            one()
            times.append(time.perf_counter() - began)
            head.weight.grad, states.grad = None, None
    logits = batch * (length - 1) * vocab * 4 / 2**20
    print(json.dumps({"peak_mib": rss.peak / 2**20 - resident, "s": sorted(times)[len(times) // 2],
                      "logits_mib": logits}))


# -- the parent --------------------------------------------------------------------------------


def _run(cmd: list[str]) -> dict | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        print(f"  failed: {' | '.join(tail)[:400]}")
        return None
    return json.loads(lines[-1])


def _ranks(strategy: str, ac: str, args: argparse.Namespace, batch: int | None = None) -> dict | None:
    return _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                 "--master_port", str(_port()), __file__, "--child", "rank", "--strategy", strategy, "--ac", ac,
                 "--steps", str(args.steps), "--batch", str(batch or args.batch)])


MEASURED: dict[str, float] = {}  # what later parts (fits) work from


def part_fsdp(args: argparse.Namespace) -> None:
    print(f"coca_base, 2 gloo ranks x 1 thread, batch {args.batch} per rank, float32, AdamW; per rank (max of ranks):")
    results = {}
    for strategy in ("ddp", "fsdp"):
        res = _ranks(strategy, "none", args)
        if res:
            results[strategy] = res
            print(f"{strategy:5s} {res['params_m']:.1f}M params  resident {res['resident_mib']:7.0f} MiB  "
                  f"step peak {res['peak_mib']:6.0f} MiB above it (forward + backward alone {res['fwd_bwd_mib']:.0f})"
                  f"  {res['s_per_step']:.2f} s/step")
    small = _ranks("fsdp", "none", argparse.Namespace(**{**vars(args), "steps": 1}), batch=max(1, args.batch // 2))
    if "fsdp" in results and small:  # the memory one more sample costs: activations alone
        extra = args.batch - max(1, args.batch // 2)
        per = (results["fsdp"]["kept_mib"] - small["kept_mib"]) / max(extra, 1)
        print(f"fsdp memory the forward keeps for backward: {results['fsdp']['kept_mib']:.0f} MiB at batch "
              f"{args.batch}, {small['kept_mib']:.0f} MiB at batch {max(1, args.batch // 2)}: activations {per:.0f} "
              "MiB per sample (float32)")
        if per > 0:
            MEASURED["activation_mib_per_sample"] = per
    if len(results) == 2:
        d, f = results["ddp"], results["fsdp"]
        weights_grads_adam = d["params_m"] * 1e6 * 16 / 2**20
        print(f"fsdp / ddp: resident {f['resident_mib'] / d['resident_mib']:.2f}x (parameters + gradients + AdamW "
              f"= {weights_grads_adam:.0f} MiB whole, expect about 0.5x on 2 ranks), total per rank "
              f"{(f['resident_mib'] + f['peak_mib']) / (d['resident_mib'] + d['peak_mib']):.2f}x, step time "
              f"{f['s_per_step'] / d['s_per_step']:.2f}x")


def part_ac(args: argparse.Namespace) -> None:
    print(f"coca_base under FSDP, 2 ranks, batch {args.batch} per rank, float32: activation checkpointing "
          "(the step's peak comes in the root unit's backward, after the blocks' activations are freed: what the "
          "forward keeps for backward shows checkpointing's effect)")
    base = None
    for ac in ("none", "full", "selective"):
        res = _ranks("fsdp", ac, args)
        if not res:
            continue
        base = base or res
        per = MEASURED.get("activation_mib_per_sample")
        if per:  # what the forward keeps beyond the activations (the gathered root unit) stays
            activations = args.batch * per
            MEASURED[f"ac_{ac}"] = max(0.0, res["kept_mib"] - (base["kept_mib"] - activations)) / activations
        print(f"ac {ac:9s} step peak {res['peak_mib']:6.0f} MiB  kept by the forward {res['kept_mib']:6.0f} MiB "
              f"({res['kept_mib'] / base['kept_mib']:.2f}x)  "
              f"{res['s_per_step']:.2f} s/step ({res['s_per_step'] / base['s_per_step']:.2f}x)")
    print("coca_tiny, one process, 2 threads, batch 32 (activations dominate the step here):")
    for precision in _precisions():
        base = None
        for ac in ("none", "full", "selective"):
            res = _run([sys.executable, __file__, "--child", "ac", "--ac", ac, "--precision", precision,
                        "--steps", str(max(args.steps, 5))])
            if not res:
                continue
            base = base or res
            print(f"{precision} ac {ac:9s} step peak {res['peak_mib']:6.0f} MiB ({res['peak_mib'] / base['peak_mib']:.2f}x)"
                  f"  {res['s_per_step']:.3f} s/step ({res['s_per_step'] / base['s_per_step']:.2f}x)")


def part_compile(args: argparse.Namespace) -> None:
    print("coca_tiny training step, batch 32, 2 threads: eager against torch.compile (first step includes compiling)")
    try:
        import open_clip  # noqa: F401

        models = ("vlframe", "open_clip")
    except ImportError:
        models = ("vlframe",)
        print("open_clip is not installed: vlframe alone")
    for precision in _precisions():
        found = {}
        for which in models:
            for compiled in (False, True):
                res = _run([sys.executable, __file__, "--child", "compile", "--which", which, "--precision", precision,
                            "--steps", str(max(args.steps, 5))] + (["--compiled"] if compiled else []))
                if res:
                    found[(which, compiled)] = res
                    print(f"{precision} {which:9s} {'compiled' if compiled else 'eager   '} {res['s_per_step']:.3f} s/step"
                          f"  (first step {res['first_s']:.1f} s)")
        for which in models:
            if (which, False) in found and (which, True) in found:
                print(f"{precision} {which}: compiled / eager step time "
                      f"{found[(which, True)]['s_per_step'] / found[(which, False)]['s_per_step']:.2f}x")
        if all((m, True) in found for m in ("vlframe", "open_clip")):
            v, o = found[("vlframe", True)], found[("open_clip", True)]
            print(f"{precision} compiled vlframe / compiled open_clip: throughput {o['s_per_step'] / v['s_per_step']:.2f}x")


def part_caption_loss(args: argparse.Namespace) -> None:
    print("captioning loss, batch 32 x 64 tokens, width 768, vocabulary 64,000 (coca_base), float32, forward + backward:")
    found = {}
    for chunked in (False, True):
        res = _run([sys.executable, __file__, "--child", "caption_loss", "--steps", str(max(args.steps, 3))]
                   + (["--chunked"] if chunked else []))
        if res:
            found[chunked] = res
            print(f"{'chunked (vlframe)' if chunked else 'whole logits     '}  peak {res['peak_mib']:6.0f} MiB  "
                  f"{res['s']:.2f} s   (one copy of the float32 logits: {res['logits_mib']:.0f} MiB)")
    if len(found) == 2:
        print(f"chunked / whole: peak memory {found[True]['peak_mib'] / found[False]['peak_mib']:.2f}x, "
              f"time {found[True]['s'] / found[False]['s']:.2f}x")


def _activation_size(config_path: Path) -> tuple[float, float, float]:
    """(parameters, sum of tokens x width x layers over the towers, largest block's parameters)."""
    import vlframe
    from vlframe.api import build_model

    cfg = vlframe.load_config(config_path).model
    enc, text, mm = cfg.image_encoder, cfg.text_decoder, cfg.multimodal_decoder
    image_tokens = (enc.image_size // enc.patch_size) ** 2
    size = image_tokens * enc.width * enc.layers + cfg.context_length * (text.width * text.layers + mm.width * mm.layers)
    model = build_model(config_path, device="meta")
    params = sum(p.numel() for p in model.parameters())
    block = max(sum(p.numel() for p in b.parameters()) for b in model.blocks())
    return params, size, block


def part_fits(args: argparse.Namespace) -> None:
    """What fits per 80 GB GPU, worked out from bytes per parameter and the measured activations."""
    if "activation_mib_per_sample" not in MEASURED:
        print("fits: needs the fsdp part's measured activations (run --part all)")
        return
    base_params, base_size, _ = _activation_size(ROOT / "configs" / "coca_base.yaml")
    # Measured on the CPU in float32; bf16 autocast on a GPU keeps about half of it.
    per_size = MEASURED["activation_mib_per_sample"] / base_size / 2
    ac_full = MEASURED.get("ac_full", 1.0)
    budget = 80e9 * 0.9 / 2**20  # MiB, leaving 10% to the allocator and the NCCL buffers
    print("per 80 GB GPU (bf16 compute, float32 master weights, gradients and AdamW: 16 B/parameter, sharded"
          f" under FSDP, plus two gathered bf16 blocks; activations from coca_base's measured "
          f"{MEASURED['activation_mib_per_sample']:.0f} MiB/sample "
          f"in float32, halved for bf16, scaled by tokens x width x layers; full checkpointing keeps {ac_full:.2f}x of "
          "them, measured on coca_base above):")
    print("| model | params | DDP state/GPU | FSDP state/GPU at 8 / 64 / 256 GPUs | activations/sample (none / full AC) "
          "| max batch/GPU at 8 GPUs (none / full AC) | at 256 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("coca_base", "coca_large", "coca"):
        params, size, block = _activation_size(ROOT / "configs" / f"{name}.yaml")
        act = per_size * size
        state = {n: 16 * params / n / 2**20 + 2 * 2 * block / 2**20 for n in (8, 64, 256)}  # + 2 gathered bf16 units
        ddp = 16 * params / 2**20 + 2 * params / 2**20

        def batch(n: int, factor: float) -> int:
            return max(0, int((budget - state[n]) // (act * factor)))

        print(f"| {name} | {params / 1e9:.2f}B | {ddp / 1024:.1f} GiB | {state[8] / 1024:.2f} / {state[64] / 1024:.2f} / "
              f"{state[256] / 1024:.2f} GiB | {act:.0f} / {act * ac_full:.0f} MiB | {batch(8, 1)} / {batch(8, ac_full)} "
              f"| {batch(256, 1)} / {batch(256, ac_full)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=("all", "fsdp", "ac", "fits", "compile", "caption_loss"),
                        default=["all"], help="fits needs fsdp (and ac) in the same run")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per rank, for the coca_base parts")
    parser.add_argument("--child", choices=("rank", "compile", "caption_loss", "ac"), help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--ac", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--which", default="vlframe", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunked", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "rank":
        return child_rank(args.strategy, args.ac, args.steps, args.batch)
    if args.child == "compile":
        return child_compile(args.which, args.compiled, args.precision, args.steps, 32)
    if args.child == "ac":
        return child_ac(args.ac, args.precision, args.steps, 32)
    if args.child == "caption_loss":
        return child_caption_loss(args.chunked, args.steps)
    print(cpu_line())
    parts = ("fsdp", "ac", "fits", "compile", "caption_loss") if "all" in args.part else tuple(args.part)
    for part in parts:
        globals()[f"part_{part}"](args)


if __name__ == "__main__":
    main()

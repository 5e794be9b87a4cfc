"""open_clip's coca_ViT-B-32 in vlframe against open_clip itself: agreement and speed on this machine.

    .venv/bin/python benchmarks/open_clip_b32.py [--images 8] [--texts 32] [--tokens 20] [--repeats 3] [--threads 2]

open_clip's model is built with random weights (nothing is downloaded; every parameter perturbed
as in tests/test_open_clip_import.py), saved to a file and converted with ``vlframe convert``'s
code; vlframe's model is loaded back from the converted folder. Both run eager, in one process
with the same thread count, in float32 and in bf16 autocast. Timed: image embeddings of
``--images`` images, text embeddings of ``--texts`` texts (76 tokens, as open_clip pads), and
greedy captions of ``--images`` images, exactly ``--tokens`` tokens each (open_clip:
``generate(generation_type="top_k", top_k=1)``, which recomputes the prefix at every step and
needs ``transformers < 4.56``; vlframe: its key/value-cached ``generate``). Figures are medians of
``--repeats`` runs after one warm-up; the agreement line gives the largest absolute difference
of the float32 embeddings and whether the greedy tokens are identical (open_clip forces EOS as
token ``--tokens``, so the tokens before it are compared).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from generate import timed  # noqa: E402


def build_open_clip(seed: int = 0):
    from open_clip.coca_model import CoCa

    from vlframe_builtins.importers.open_clip import ARCHITECTURES

    oc = ARCHITECTURES["coca_ViT-B-32"]
    torch.manual_seed(seed)
    model = CoCa(oc["embed_dim"], oc["multimodal_cfg"], oc["text_cfg"], oc["vision_cfg"])
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)  # left empty there
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(100.0))
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--texts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import open_clip

    from vlframe.interchange.convert import convert_checkpoint
    from vlframe.inference.generation import generate
    from vlframe.inference.trained import load_trained

    reference = build_open_clip()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "open_clip_pytorch_model.bin"
        torch.save(reference.state_dict(), weights)
        trained = load_trained(convert_checkpoint("open-clip", "coca_ViT-B-32", weights, Path(tmp) / "b32"))
    ours = trained.model
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=gen)
    words = "a dog runs through the snow while two children play with a red ball near the old wooden house".split()
    texts = [" ".join(words[: 3 + i % (len(words) - 3)]) for i in range(args.texts)]
    text = open_clip.tokenizer.tokenize(texts, context_length=76)
    n = args.tokens
    print(f"open_clip coca_ViT-B-32 (random weights) vs vlframe's conversion, {args.threads} threads, eager, "
          f"median of {args.repeats}")
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.machine()}, "
          f"python {platform.python_version()}")

    def oc_caption():
        return reference.generate(images, generation_type="top_k", top_k=1, seq_len=n + 1, min_seq_len=n)

    def vl_caption():
        return generate(ours, images, bos_id=49406, eos_id=49407, pad_id=0, banned_ids=(), strategy="greedy",
                        max_length=n, min_length=n).tokens

    with torch.no_grad():
        diff_img = (ours.encode_image(images) - reference.encode_image(images)).abs().max().item()
        diff_txt = (ours.encode_text(text) - reference.encode_text(text)).abs().max().item()
        try:
            # open_clip forces EOS as token n: the n - 1 tokens before it are compared
            same = torch.equal(oc_caption()[:, 1:n], vl_caption()[:, 0, : n - 1])
        except Exception as exc:  # noqa: BLE001 - open_clip's generate needs a compatible transformers
            same = f"open_clip generate failed: {type(exc).__name__}: {exc}"
    print(f"agreement (fp32): image embeddings max |diff| {diff_img:.1e}, text embeddings {diff_txt:.1e}, "
          f"greedy captions identical: {same}")
    for precision in ("fp32", "bf16"):
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        rows = {}
        with torch.no_grad(), cast:
            rows["image embeddings"] = (timed(lambda: reference.encode_image(images), args.repeats),
                                        timed(lambda: ours.encode_image(images), args.repeats), args.images, "images")
            rows["text embeddings"] = (timed(lambda: reference.encode_text(text), args.repeats),
                                       timed(lambda: ours.encode_text(text), args.repeats), args.texts, "texts")
            oc_time = timed(oc_caption, args.repeats) if same is True else float("nan")
            rows["greedy captions"] = (oc_time, timed(vl_caption, args.repeats), args.images, "captions")
        for what, (theirs, mine, count, unit) in rows.items():
            print(f"{precision} {what:17s} open_clip {theirs:7.3f} s ({count / theirs:7.1f} {unit}/s)  "
                  f"vlframe {mine:7.3f} s ({count / mine:7.1f} {unit}/s)  vlframe/open_clip speed {theirs / mine:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

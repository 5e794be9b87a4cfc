"""Train coca_tiny on Flickr8k for a fixed budget; report validation caption loss and retrieval.

    .venv/bin/python benchmarks/flickr8k.py [--steps 2400] [--set KEY=VALUE ...]

Uses configs/flickr8k.yaml (the recipe of the open_clip figures in ../shared/reference.md) and
the data in ../shared/data/flickr8k. Retrieval follows the Flickr protocol: 399 validation
images, 5 captions each; image->text counts a hit when any of the image's captions ranks in
the top k. The run is tracked in MLflow like any other (runs/mlflow.db).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k"

IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette"

# open_clip 3.3.0 at the same shape and budget, from ../shared/reference.md (2,823 s there).
OPEN_CLIP = {"i2t_r1": 2.76, "i2t_r5": 10.28, "i2t_r10": 17.04, "t2i_r1": 2.76, "t2i_r5": 9.62, "t2i_r10": 17.44,
             "bleu4": 7.98, "meteor": 14.17, "rouge_l": 35.52, "cider": 18.97}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--caption-images", type=int, default=300, help="val images to caption (reference: 300)")
    args = parser.parse_args()
    if not (DATA / "train.jsonl").is_file():
        print(f"Flickr8k is not at {DATA}: nothing to measure")
        return 1

    import torch

    from vlframe.config import files as configfile
    from vlframe.training.trainer import Trainer

    config_path = ROOT / "configs" / "flickr8k.yaml"
    overrides = [f"train.steps={args.steps}", f"data.train.path={DATA / 'train.jsonl'}",
                 f"data.val.path={DATA / 'val.jsonl'}", *args.overrides]
    config, registry = configfile.load(config_path, overrides)
    t = config.train
    print(f"budget: {t.steps} steps x batch {t.batch_size} (one random caption per image per step), "
          f"{t.optimizer} lr {t.lr}, warmup {t.warmup_steps}, {t.schedule}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    began = time.time()
    result = Trainer(config, registry, run_dir=args.run_dir, name=config_path.stem).fit()
    run_dir = result.run_dir
    elapsed = time.time() - began
    val = result.val
    print(f"\nflickr8k val ({elapsed:.0f} s for {result.step} steps, run {run_dir}):")
    print(f"  caption loss {val.get('val/loss_caption', float('nan')):.3f}   "
          f"contrastive loss {val.get('val/loss_contrastive', float('nan')):.3f}")
    print("  retrieval      R@1    R@5   R@10")
    for way, label in (("i2t", "image->text"), ("t2i", "text->image")):
        ours = [val.get(f"val/retrieval/{way}_r{k}", float("nan")) for k in (1, 5, 10)]
        peer = [OPEN_CLIP[f"{way}_r{k}"] for k in (1, 5, 10)]
        print(f"  {label:12s} {ours[0]:6.2f} {ours[1]:6.2f} {ours[2]:6.2f}   "
              f"(open_clip, reference.md: {peer[0]:.2f} / {peer[1]:.2f} / {peer[2]:.2f})")

    # Greedy captions of the first 300 val images against their 5 references (the reference
    # protocol), then zero-shot classification of Imagenette, with the final weights.
    from vlframe.evaluation.tasks import log_results, run_task, task_config
    from vlframe.inference.trained import load_trained

    trained = load_trained(result.checkpoint, precision=config.train.precision)
    catalog = trained.registry.catalog
    names = {"bleu4": "BLEU-4", "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr"}
    results = []
    # Plain greedy is the reference's protocol; vlframe's captioning default blocks repeated bigrams.
    for label, name, blocking in (("greedy", "caption_greedy", 0), ("greedy + bigram blocking (default)", "caption", 2)):
        began = time.time()
        caption_dir = run_dir / "eval" / name
        block = {"type": "caption", "data": str(DATA / "val.jsonl"), "limit": args.caption_images,
                 "generation": {"no_repeat_ngram_size": blocking}}
        captions = run_task(trained, task_config(catalog, block, "benchmark"), name=name, out_dir=caption_dir)
        print(f"  captions, {label}, first {captions.info['images']} val images ({time.time() - began:.0f} s; "
              f"table: {caption_dir / 'captions.html'}):")
        print("   " + "   ".join(f"{lab} {captions.metrics[key]:.2f}" for key, lab in names.items()))
        results.append(captions)
    print("   (open_clip, reference.md, greedy: " + "   ".join(f"{label} {OPEN_CLIP[key]:.2f}"
                                                           for key, label in names.items()) + ")")
    if IMAGENETTE.is_dir():
        zeroshot = run_task(trained, task_config(catalog, {"type": "zeroshot", "data": str(IMAGENETTE)}, "benchmark"))
        print(f"  zero-shot Imagenette ({zeroshot.info['images']} images, {zeroshot.info['classes']} classes, "
              f"{zeroshot.info['templates']} prompt templates): top-1 {zeroshot.metrics['top1']:.2f}   "
              f"top-5 {zeroshot.metrics['top5']:.2f}   (chance: 10.00 / 50.00)")
        results.append(zeroshot)
    else:
        print(f"  zero-shot skipped: no Imagenette at {IMAGENETTE}")
    log_results(trained, results, run_dir / "eval" / "benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())

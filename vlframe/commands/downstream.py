"""``vlframe eval``, ``vlframe caption`` and ``vlframe embed``: a trained model at work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from registry import Capability, ConfigError, Kind, Problem, VlframeError, require_capabilities
from vlframe.commands.base import (
    Command,
    add_generation,
    add_runtime,
    add_set,
    generation_config,
    load_trained,
    task_settings,
)


class Eval(Command):
    name, help = "eval", "evaluate a trained model with a task; metrics go to its tracked run"
    takes_extra = reads_user_files = True
    epilog = ("Any other --NAME VALUE (or a bare --NAME, meaning true) sets the task's setting NAME, e.g. "
              "--head attentional --finetune (probe), --templates FILE (zeroshot), --metrics '[cider, bleu4]' "
              "(caption); vlframe config schema lists every task's settings.")

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="run folder, checkpoint folder or tracked run id")
        parser.add_argument("--task", required=True, metavar="TASK",
                            help="a registered task: caption, retrieval, zeroshot, probe, understanding, or a plugin's")
        parser.add_argument("--data", help="dataset: a folder (ImageFolder), .jsonl/.csv, COCO .json, a dataset .yaml, "
                                           "or a dataset's name such as synthetic (default: the run's validation "
                                           "split); understanding: the test JSONL")
        parser.add_argument("--train-data", help="probe: a separate training set (default: split --data per class); "
                                                 "understanding: the training JSONL (required)")
        parser.add_argument("--limit", type=int, help="use only N images: the first N, or for labelled (ImageFolder) "
                                                      "data N evenly spaced ones, so that every class is in")
        parser.add_argument("--batch-size", type=int)
        parser.add_argument("--steps", type=int, help="probe/understanding: training steps (default 300)")
        parser.add_argument("--lr", type=float, help="probe/understanding: learning rate of the head")
        add_set(parser, "task setting", "limit=64")
        parser.add_argument("--out", type=Path, help="folder for the results (default: RUN/eval/TASK-CHECKPOINT-TIME)")
        parser.add_argument("--no-track", action="store_true", help="do not log to the tracked run")
        add_runtime(parser)
        add_generation(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.evaluation.report import save_result
        from vlframe.evaluation.tasks import default_out_dir, log_results, run_task, settings_block

        trained = load_trained(args)
        catalog = trained.registry.catalog
        try:
            wanted = catalog.get(Kind.TASK, args.task).spec.config
        except VlframeError as exc:
            raise ConfigError([Problem("--task", str(exc))]) from None
        require_capabilities(trained.model, wanted.requires, f"task '{args.task}'")  # before its settings are checked
        task = settings_block(catalog, args.task, task_settings(args, args.extra), args.overrides)
        out = args.out or default_out_dir(trained, args.task)
        result = run_task(trained, task, out_dir=out)
        save_result(result, out)
        print(result.summary())
        print(f"results: {out}")
        if not args.no_track:
            for line in log_results(trained, [result], out, uri=args.tracking_uri or None):
                print(line)
        return 0


class Caption(Command):
    name, help = "caption", "caption image files with a trained model"
    reads_user_files = True

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", metavar="RUN_OR_CHECKPOINT")
        parser.add_argument("images", nargs="+", type=Path)
        parser.add_argument("--json", action="store_true", help="print one JSON object per image")
        add_runtime(parser)
        add_generation(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.data.samples import SampleError

        trained = load_trained(args)
        trained.require(Capability.CAPTIONING, "vlframe caption")
        config = generation_config(args)
        for path in args.images:
            try:
                images = trained.load_images([path])
            except SampleError as err:
                raise ConfigError([Problem("", str(err))]) from None
            captions = trained.caption(images, config)[0]
            if args.json:
                print(json.dumps({"image": str(path), "captions": captions}))
            else:
                for text in captions:
                    print(f"{path}: {text}")
        return 0


class Embed(Command):
    name, help = "embed", "write contrastive embeddings of images, texts or a dataset"
    reads_user_files = True

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", metavar="RUN_OR_CHECKPOINT")
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--images", nargs="+", type=Path, help="image files")
        what.add_argument("--texts", type=Path, help="a text file, one text per line")
        what.add_argument("--data", help="a dataset (as for eval): its images and all their captions")
        parser.add_argument("--out", type=Path, required=True,
                            help="a .safetensors file (keys and texts go beside it, .json)")
        parser.add_argument("--limit", type=int)
        parser.add_argument("--batch-size", type=int, default=64)
        add_runtime(parser)

    def run(self, args: argparse.Namespace) -> int:
        import torch
        from safetensors.torch import save_file

        from vlframe.evaluation.datasets import build_dataset, embed_dataset

        trained = load_trained(args)
        trained.require(Capability.CONTRASTIVE, "vlframe embed")
        tensors, listing = {}, {}
        if args.images:
            names = [str(p) for p in args.images]
            tensors["image_embeds"] = torch.cat([
                trained.embed_images(trained.load_images(args.images[i : i + args.batch_size]))
                for i in range(0, len(names), args.batch_size)])
            listing["images"] = names
        elif args.texts:
            texts = [t for t in args.texts.read_text(encoding="utf-8").splitlines() if t.strip()]
            tensors["text_embeds"] = trained.embed_texts(texts, batch_size=args.batch_size)
            listing["texts"] = texts
        else:
            data = build_dataset(trained, args.data)
            images, texts, owners, keys, captions = embed_dataset(trained, data, limit=args.limit,
                                                                  batch_size=args.batch_size)
            tensors.update(image_embeds=images, text_embeds=texts, text_image=owners)
            listing.update(images=keys, texts=captions)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(args.out),
                  metadata={"checkpoint": str(trained.checkpoint), "normalized": "true"})
        sidecar = args.out.with_suffix(".json")
        sidecar.write_text(json.dumps(listing, indent=1), encoding="utf-8")
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
        print(f"wrote {shapes} to {args.out} (order in {sidecar})")
        return 0


COMMANDS = [Eval(), Caption(), Embed()]

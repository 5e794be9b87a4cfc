"""``vlframe train`` and ``vlframe tokenizer train``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from registry import BuildError, ConfigError, Kind, Problem
from vlframe.commands.base import Command, add_set


class Train(Command):
    name, help = "train", "train a model (tracked); runs under torchrun too"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        add_set(parser)
        parser.add_argument("--run-dir", type=Path,
                            help="run folder (default: a new <train.output_dir>/<config>-<date>-<time>-<hex>)")
        parser.add_argument("--resume", type=Path, metavar="RUN_OR_CHECKPOINT",
                            help="continue from a checkpoint folder, or the newest checkpoint of a run folder")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.config import files as configfile
        from vlframe.training.trainer import Trainer

        try:
            config, registry = configfile.load(args.file, args.overrides)
            result = Trainer(config, registry, run_dir=args.run_dir, resume=args.resume, name=args.file.stem).fit()
        except ConfigError as exc:  # the problem is in this file (or its --set)
            raise ConfigError([p if p.file else replace(p, file=str(args.file)) for p in exc.problems]) from exc
        except BuildError as exc:  # a component of this file's config does not build
            raise BuildError(f"{args.file}: {exc}") from exc
        if result.checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
            print(f"trained {result.step} steps; final checkpoint: {result.checkpoint}")
        return 0


def dataset(config, registry, split: str):
    """The config's ``data.<split>`` dataset, built."""
    from vlframe.data.samples import set_max_image_pixels

    if config.data is None:
        raise ConfigError([Problem("data", "this config has no data section")])
    set_max_image_pixels(config.data.max_image_pixels)
    block = config.data.train if split == "train" else config.data.val
    if block is None:
        raise ConfigError([Problem(f"data.{split}", "not set")])
    return registry.catalog.build(Kind.DATASET, block, path=f"data.{split}", split=split)


class TrainTokenizer(Command):
    group, name, help = "tokenizer", "train", "train the config's tokenizer on its training captions"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--out", type=Path, default=Path("."), help="folder for tokenizer.model (default: here)")
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.api import build_tokenizer
        from vlframe.config import files as configfile

        config, registry = configfile.load(args.file, args.overrides)
        data = dataset(config, registry, "train")
        tokenizer = build_tokenizer(config, registry)
        path = tokenizer.train(data.captions(), args.out)
        print(f"{path}: {tokenizer.vocab_size} pieces from {data.describe()}")
        print(f"use it with: --set tokenizer.path={path}")
        return 0


COMMANDS = [Train(), TrainTokenizer()]

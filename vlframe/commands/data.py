"""``vlframe data write-shards|match-pairs``: a config's dataset written out in other forms."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlframe.commands.base import Command, add_set
from vlframe.commands.training import dataset


class WriteShards(Command):
    group, name, help = "data", "write-shards", "write a config's dataset as WebDataset tar shards"
    reads_user_files = True

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--split", choices=("train", "val"), default="train")
        parser.add_argument("--out", type=Path, required=True, help="folder for the shards")
        parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.config import files as configfile
        from vlframe.interchange.shard_writer import write_shards

        config, registry = configfile.load(args.file, args.overrides)
        data = dataset(config, registry, args.split)
        paths, written, skipped = write_shards(data, args.out, prefix=args.split, shard_size=args.shard_size)
        built = list(getattr(data, "skipped", []))  # set aside when the dataset was built
        total = len(skipped) + len(built)
        print(f"wrote {written} samples to {len(paths)} shard(s) in {args.out}; {total} unusable skipped"
              + (f" ({len(built)} when the dataset was built, {len(skipped)} when read)" if total else ""))
        for err in [*built, *skipped][:10]:
            print(f"  skipped {err}")
        if total > 10:
            print(f"  ... and {total - 10} more")
        print(f"use them with: data.{args.split}: {{type: shards, urls: {args.out}/{args.split}-"
              f"{{000000..{len(paths) - 1:06d}}}.tar}}")
        return 0


class MatchPairs(Command):
    group, name, help = "data", "match-pairs", "derive an image-caption matching task (JSONL) from a config's dataset"
    reads_user_files = True

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--split", choices=("train", "val"), default="val")
        parser.add_argument("--out", type=Path, required=True, help="folder for the images and pairs.jsonl")
        parser.add_argument("--limit", type=int, help="use only the first N images")
        parser.add_argument("--seed", type=int, default=0)
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.config import files as configfile
        from vlframe.interchange.match_pairs import write_match_pairs

        config, registry = configfile.load(args.file, args.overrides)
        path = write_match_pairs(dataset(config, registry, args.split), args.out, limit=args.limit, seed=args.seed)
        rows = path.read_text(encoding="utf-8").count("\n")
        print(f"wrote {rows} (image, caption, yes/no) rows to {path}")
        return 0


COMMANDS = [WriteShards(), MatchPairs()]

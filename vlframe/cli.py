"""The ``vlframe`` command.

User errors (bad config, bad plugin) print one line per problem on stderr and exit with code 2,
without a traceback; a traceback means a bug in vlframe or in a plugin's code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from registry import ConfigError, Kind, Registry, VlframeError

EXIT_USAGE = 2


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.text_decoder.layers=3 (repeatable)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlframe", description="Plugin-based vision-language models (CoCa).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="validate, show and describe config files").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = config.add_parser("validate", help="validate config files")
    p.add_argument("files", nargs="+", type=Path)
    _add_set(p)
    p.set_defaults(func=cmd_config_validate)
    p = config.add_parser("show", help="print a config fully resolved (extends, overrides, defaults)")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    _add_set(p)
    p.set_defaults(func=cmd_config_show)
    p = config.add_parser("schema", help="print the JSON Schema of config files (every registered plugin)")
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.set_defaults(func=cmd_config_schema)

    plugins = sub.add_parser("plugins", help="inspect plugins").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = plugins.add_parser("list", help="every registered component with its kind and source")
    p.add_argument("--kind", choices=[k.value for k in Kind], help="only this kind")
    p.set_defaults(func=cmd_plugins_list)

    model = sub.add_parser("model", help="inspect models").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = model.add_parser("summary", help="parameter counts by component (built on the meta device)")
    p.add_argument("file", type=Path)
    _add_set(p)
    p.set_defaults(func=cmd_model_summary)

    p = sub.add_parser("train", help="train a model (tracked in MLflow); runs under torchrun too")
    p.add_argument("file", type=Path)
    _add_set(p)
    p.add_argument("--run-dir", type=Path, help="run folder (default: <train.output_dir>/<config>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_OR_CHECKPOINT",
                   help="continue from a checkpoint folder, or the newest checkpoint of a run folder")
    p.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = tok.add_parser("train", help="train the config's tokenizer on its training captions")
    p.add_argument("file", type=Path)
    p.add_argument("--out", type=Path, default=Path("."), help="folder for tokenizer.model (default: here)")
    _add_set(p)
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="action", required=True, metavar="ACTION")
    p = data.add_parser("write-shards", help="write a config's dataset as WebDataset tar shards")
    p.add_argument("file", type=Path)
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    _add_set(p)
    p.set_defaults(func=cmd_data_write_shards)

    tracking = sub.add_parser("tracking", help="MLflow tracking").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    p = tracking.add_parser("sync", help="deliver a run's journaled metrics that never reached MLflow")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--uri", help="tracking URI (default: the one the run used)")
    p.set_defaults(func=cmd_tracking_sync)
    return parser


# -- commands ---------------------------------------------------------------------------------


def cmd_config_validate(args: argparse.Namespace) -> int:
    """Validate each file, then build its model on the meta device (no memory), so that
    settings which only conflict once parts meet (say, heads that do not divide a width) are
    caught here rather than at training time."""
    from vlframe import configfile
    from vlframe.api import build_model

    failed = False
    for path in args.files:
        try:
            config, registry = configfile.load(path, args.overrides)
            build_model(config, registry=registry, device="meta")
        except ConfigError as exc:
            failed = True
            for problem in exc.problems:  # a problem without a file (from --set) belongs to this one
                print(f"error: {replace(problem, file=problem.file or str(path))}", file=sys.stderr)
        except VlframeError as exc:
            failed = True
            for line in exc.lines():
                print(f"error: {path}: {line}", file=sys.stderr)
        else:
            print(f"ok: {path}")
    return EXIT_USAGE if failed else 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from vlframe import configfile

    config, _ = configfile.load(args.file, args.overrides)
    if args.format == "json":
        print(json.dumps(configfile.dump(config), indent=2))
    else:
        print(configfile.to_yaml(config), end="")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from vlframe.schema import config_schema

    text = json.dumps(config_schema(Registry.discover().catalog), indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_plugins_list(args: argparse.Namespace) -> int:
    registry = Registry.discover()
    kind = Kind(args.kind) if args.kind else None
    rows = [("KIND", "NAME", "PLUGIN", "DISTRIBUTION", "SUMMARY")]
    for entry in registry.catalog.entries(kind):
        rows.append((entry.kind.value, entry.spec.name, entry.plugin, entry.distribution or "-", entry.spec.summary))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4])
    return 0


def cmd_model_summary(args: argparse.Namespace) -> int:
    from vlframe.api import build_model
    from vlframe.summary import parameter_counts

    model = build_model(args.file, args.overrides, device="meta")
    counts = parameter_counts(model)
    width = max(len(name) for name in counts)
    for name, count in counts.items():
        print(f"{name.ljust(width)}  {count:>15,}  ({count / 1e6:,.1f}M)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vlframe import checkpoint, configfile
    from vlframe.trainer import Trainer, default_run_dir

    config, registry = configfile.load(args.file, args.overrides)
    run_dir = args.run_dir
    if run_dir is None and args.resume is not None:
        run_dir = checkpoint.run_dir_of(args.resume)  # continue in the folder it came from
    run_dir = run_dir or default_run_dir(args.file, config.train.output_dir)
    result = Trainer(config, registry, run_dir=run_dir, resume=args.resume).fit()
    if result.checkpoint is not None:
        print(f"trained {result.step} steps; final checkpoint: {result.checkpoint}")
    return 0


def _datasets(config, registry, split: str):
    from registry import ConfigError, Problem

    if config.data is None:
        raise ConfigError([Problem("data", "this config has no data section")])
    block = config.data.train if split == "train" else config.data.val
    if block is None:
        raise ConfigError([Problem(f"data.{split}", "not set")])
    return registry.catalog.build(Kind.DATASET, block, path=f"data.{split}", split=split)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from vlframe import configfile
    from vlframe.api import build_tokenizer

    config, registry = configfile.load(args.file, args.overrides)
    dataset = _datasets(config, registry, "train")
    tokenizer = build_tokenizer(config, registry)
    path = tokenizer.train(dataset.captions(), args.out)
    print(f"{path}: {tokenizer.vocab_size} pieces from {dataset.describe()}")
    print(f"use it with: --set tokenizer.path={path}")
    return 0


def cmd_data_write_shards(args: argparse.Namespace) -> int:
    from vlframe import configfile
    from vlframe.shards import write_shards

    config, registry = configfile.load(args.file, args.overrides)
    dataset = _datasets(config, registry, args.split)
    paths, written, skipped = write_shards(dataset, args.out, prefix=args.split, shard_size=args.shard_size)
    print(f"wrote {written} samples to {len(paths)} shard(s) in {args.out} ({skipped} unusable skipped)")
    print(f"use them with: data.{args.split}: {{type: shards, urls: {args.out}/{args.split}-{{000000..{len(paths) - 1:06d}}}.tar}}")
    return 0


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    from vlframe.tracking import sync

    delivered, run_id = sync(args.run_dir, args.uri)
    print(f"delivered {delivered} event(s) to MLflow run {run_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except VlframeError as exc:
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

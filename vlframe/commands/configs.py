"""``vlframe config validate|show|schema`` and ``vlframe model summary``: configs and the models they build."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from registry import ConfigError, Registry, VlframeError, debugging
from vlframe.commands.base import EXIT_USAGE, Command, add_set


class Validate(Command):
    group, name, help = "config", "validate", "validate config files"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("files", nargs="+", type=Path)
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        """Validate each file, then build its model on the meta device (no memory) and its tokenizer,
        so that settings which only conflict once parts meet (heads that do not divide a width, a
        tokenizer with more pieces than the model's vocabulary, an absurd size) are caught here
        rather than at training time."""
        from vlframe.api import build_tokenizer, check_size
        from vlframe.config import files as configfile

        failed = False
        for path in args.files:
            try:
                config, registry = configfile.load(path, args.overrides)
                check_size(config, registry)
                if config.tokenizer is not None:
                    build_tokenizer(config, registry)
            except ConfigError as exc:
                failed = True
                for problem in exc.problems:  # a problem without a file (from --set) belongs to this one
                    print(f"error: {replace(problem, file=problem.file or str(path))}", file=sys.stderr)
            except VlframeError as exc:
                failed = True
                for line in exc.lines():
                    print(f"error: {path}: {line}", file=sys.stderr)
                if debugging():
                    traceback.print_exception(exc, file=sys.stderr)
            else:
                print(f"ok: {path}")
        return EXIT_USAGE if failed else 0


class Show(Command):
    group, name, help = "config", "show", "print a config fully resolved (extends, overrides, defaults)"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--format", choices=("yaml", "json"), default="yaml")
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.config import files as configfile

        config, _ = configfile.load(args.file, args.overrides)
        if args.format == "json":
            print(json.dumps(configfile.dump(config), indent=2))
        else:
            print(configfile.to_yaml(config), end="")
        return 0


class Schema(Command):
    group, name, help = "config", "schema", "print the JSON Schema of config files (every registered plugin)"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.config.schema import config_schema

        text = json.dumps(config_schema(Registry.discover().catalog), indent=2)
        if args.output:
            args.output.write_text(text + "\n", encoding="utf-8")
            print(f"wrote {args.output}")
        else:
            print(text)
        return 0


class Summary(Command):
    group, name, help = "model", "summary", "parameter counts by component (built on the meta device)"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path)
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.api import build_model, parameter_counts

        counts = parameter_counts(build_model(args.file, args.overrides, device="meta"))
        width = max(len(name) for name in counts)
        for name, count in counts.items():
            print(f"{name.ljust(width)}  {count:>15,}  ({count / 1e6:,.1f}M)")
        return 0


COMMANDS = [Validate(), Show(), Schema(), Summary()]

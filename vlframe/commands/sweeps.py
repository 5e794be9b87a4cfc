"""``vlframe sweep`` and ``vlframe compare``: ablations, run and read back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlframe.commands.base import EXIT_USAGE, Command, add_set, positive


class Sweep(Command):
    name, help = "sweep", "train and evaluate a sweep's variants, each a tracked child run"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("file", type=Path, metavar="SWEEP.yaml")
        parser.add_argument("--steps", type=positive, help="train every variant for this many steps (quick trials)")
        parser.add_argument("--only", nargs="+", default=[], metavar="VARIANT", help="run only these variants")
        parser.add_argument("--seeds", type=positive, metavar="N",
                            help="train every variant with seeds 0..N-1 (instead of the file's seeds)")
        parser.add_argument("--list", action="store_true", help="list the variants and their overrides; train nothing")
        add_set(parser)

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.sweeps import sweep as sweeps

        seeds = list(range(args.seeds)) if args.seeds else None
        if args.list:
            config = sweeps.load_sweep(args.file, args.overrides)
            variants, _ = sweeps.build_variants(config, args.file, cli_sets=args.overrides, steps=args.steps,
                                                only=args.only, seeds=seeds)
            for v in variants:
                state = f"error: {v.error}" if v.error else f"config {v.hash}"
                print(f"{v.label}: {json.dumps(v.overrides)} ({state})")
            return EXIT_USAGE if any(v.error for v in variants) else 0
        parent, outcomes = sweeps.run_sweep(args.file, cli_sets=args.overrides, steps=args.steps, only=args.only,
                                            seeds=seeds)
        counts = {s: sum(o.status == s for o in outcomes) for s in ("finished", "skipped", "failed")}
        print(f"sweep done: {counts['finished']} finished, {counts['skipped']} skipped, {counts['failed']} failed "
              f"(parent run {parent}); compare with: vlframe compare {args.file}")
        return 1 if counts["failed"] else 0


class Compare(Command):
    name, help = "compare", "a sweep's variants side by side, read back from its tracking store"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("source", metavar="SWEEP_OR_PARENT_RUN", help="the sweep file, or its parent run's id")
        parser.add_argument("--tracking-uri", help="tracking store (default: the sweep's, or the default sink's)")
        parser.add_argument("--metrics", nargs="+", default=[], metavar="PATTERN",
                            help="only the columns matching these glob patterns, e.g. 'eval/*' 'val/loss*'")
        parser.add_argument("--out", type=Path,
                            help="folder for comparison.csv/.md/.png (default <sweep folder>/comparison)")
        parser.add_argument("--baseline", metavar="VARIANT", help="test every variant against this one (paired over seeds)")
        add_set(parser, "config value of the sweep's base (as given to vlframe sweep)", "train.output_dir=runs2")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe.sweeps.comparison import compare

        parent, text, files, report = compare(args.source, tracking_uri=args.tracking_uri, out_dir=args.out,
                                              metrics=args.metrics, baseline=args.baseline, cli_sets=args.overrides)
        print(text)
        print(f"written: {', '.join(map(str, files))} (also artifacts of parent run {parent}, folder comparison/)")
        for line in report.problems:
            print(line)
        return 0


COMMANDS = [Sweep(), Compare()]

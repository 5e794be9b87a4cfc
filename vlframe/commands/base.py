"""What every command shares: the :class:`Command` shape and the arguments several commands take.

A command is one object: its name (and the group it belongs to, ``vlframe config validate``),
its help, the arguments it adds to its own parser, and :meth:`Command.run`. The ``vlframe``
program (:mod:`vlframe.cli`) builds its parser from the list of commands
(:data:`vlframe.commands.COMMANDS`) and runs the one asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, ClassVar

from registry import ConfigError, Problem

EXIT_USAGE = 2


class Command:
    """One ``vlframe`` command: ``group`` (None for a top-level command), ``name``, ``help``;
    :meth:`arguments` adds its own arguments, :meth:`run` does it and returns the exit code."""

    group: ClassVar[str | None] = None
    name: ClassVar[str]
    help: ClassVar[str]
    #: Unknown ``--name VALUE`` arguments are the command's own (``eval``'s task settings).
    takes_extra: ClassVar[bool] = False
    #: A ``ValueError`` is the user's input not suiting the command (a dataset, a file): exit 2.
    reads_user_files: ClassVar[bool] = False
    epilog: ClassVar[str | None] = None

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's arguments to its parser."""

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


def add_set(parser: argparse.ArgumentParser, what: str = "config value", example: str = "train.lr=1e-3") -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help=f"override a {what}, e.g. --set {example} (repeatable; the value is read as YAML)",
    )


def add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto: bf16 where the hardware computes it natively")
    parser.add_argument("--tracking-uri", help="tracking store of a run id (default: the default sink's, MLflow's "
                                               "$MLFLOW_TRACKING_URI or ./runs/mlflow.db); eval logs there too")


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


#: Generation settings: command-line flags of `eval` (caption task) and `caption`.
GENERATION_FLAGS = ("strategy", "num_beams", "length_penalty", "max_length", "min_length", "top_k", "top_p",
                    "temperature", "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "seed",
                    "compile")


def add_generation(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--strategy", choices=("greedy", "beam", "sample"))
    group.add_argument("--num-beams", type=int)
    group.add_argument("--length-penalty", type=float)
    group.add_argument("--max-length", type=int, help="most generated tokens")
    group.add_argument("--min-length", type=int)
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--temperature", type=float)
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--no-repeat-ngram-size", type=int, help="n-gram blocking: never repeat an n-gram (0: off)")
    group.add_argument("--compile", action="store_true", default=None,
                       help="compile the decode step over a static key/value cache (not faster on a CPU; see README)")
    group.add_argument("-n", "--num-return-sequences", type=int, help="captions per image")
    group.add_argument("--seed", type=int, help="sampling seed (probe/understanding: their seed)")


def generation_config(args: argparse.Namespace) -> Any:
    """The captioning defaults with the generation flags given."""
    from pydantic import ValidationError

    from vlframe.config.files import problems_from
    from vlframe.inference.generation import GenerationConfig

    given = {n: getattr(args, n) for n in GENERATION_FLAGS if getattr(args, n, None) is not None}
    try:
        return GenerationConfig.for_captions(**given)
    except ValidationError as exc:  # each problem under the flag that caused it
        raise ConfigError([Problem("--" + p.path.replace("_", "-") if p.path else "generation", p.message)
                           for p in problems_from(exc, GenerationConfig, given, None, None)]) from None


#: `vlframe eval` flags declared for --help; any other `--name VALUE` (or bare `--name`: true) is
#: passed on the same way, to the task's setting of that name (dashes read as underscores).
TASK_FLAGS = ("data", "train_data", "limit", "batch_size", "steps", "lr", *GENERATION_FLAGS)


def task_settings(args: argparse.Namespace, extra: Sequence[str]) -> dict[str, object]:
    """The task settings given as flags: the declared ones, and every other ``--name [VALUE]``."""
    import yaml

    settings: dict[str, object] = {flag: getattr(args, flag) for flag in TASK_FLAGS
                                   if getattr(args, flag, None) is not None}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigError([Problem(token, "unexpected argument (task settings are --name VALUE)")])
        name, _, inline = token[2:].partition("=")
        if inline:
            value, i = inline, i + 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            value, i = extra[i + 1], i + 2
        else:
            value, i = "true", i + 1
        try:
            settings[name.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            settings[name.replace("-", "_")] = value
    return settings


def table(rows: list[tuple[str, ...]]) -> None:
    """Print ``rows`` as aligned columns (the last one unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])


def load_trained(args: argparse.Namespace) -> Any:
    """The trained model ``args.source`` names, on ``--device`` in ``--precision``; notes on stderr."""
    import sys

    from vlframe.inference.trained import load_trained as load

    trained = load(args.source, device=args.device, precision=args.precision, tracking_uri=args.tracking_uri)
    for line in trained.passed_over:
        print(f"note: {line}", file=sys.stderr)
    return trained


__all__ = ["Command", "EXIT_USAGE", "GENERATION_FLAGS", "TASK_FLAGS", "add_generation", "add_runtime", "add_set",
           "generation_config", "load_trained", "positive", "table", "task_settings"]

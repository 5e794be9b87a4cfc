"""The ``vlframe`` command: the parser built from the command objects (:mod:`vlframe.commands`), and
how a command's failure is said.

User errors (bad config, bad plugin, a model without what a task needs) print one line per
problem on stderr and exit with code 2, without a traceback; ``--debug`` (or ``VLFRAME_DEBUG=1``)
adds the traceback. A traceback without ``--debug`` means a bug in vlframe or in a plugin.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from registry import ENV_DEBUG, VlframeError, debugging
from vlframe.commands import COMMANDS, GROUPS
from vlframe.commands.base import EXIT_USAGE, generation_config, task_settings  # noqa: F401 - kept importable


def parser() -> argparse.ArgumentParser:
    """The ``vlframe`` argument parser: a subparser per command, grouped as ``vlframe GROUP ACTION``."""
    root = argparse.ArgumentParser(prog="vlframe", description="Plugin-based vision-language models (CoCa).")
    root.add_argument("--debug", action="store_true", help="print tracebacks of errors (also VLFRAME_DEBUG=1)")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for command in COMMANDS:
        where = sub
        if command.group is not None:
            if command.group not in groups:
                groups[command.group] = sub.add_parser(command.group, help=GROUPS[command.group]).add_subparsers(
                    dest="action", required=True, metavar="ACTION")
            where = groups[command.group]
        # An unknown --name of a command taking extra settings is a setting, never an abbreviation.
        own = where.add_parser(command.name, help=command.help, epilog=command.epilog,
                               allow_abbrev=not command.takes_extra)
        command.arguments(own)
        own.set_defaults(command_object=command)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    root = parser()
    args, extra = root.parse_known_args(argv)
    command = args.command_object
    if extra and not command.takes_extra:
        root.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    if args.debug:
        os.environ[ENV_DEBUG] = "1"  # also for the processes this one starts (sweep variants)
    try:
        return command.run(args)
    except VlframeError as exc:
        _report(exc)
        return EXIT_USAGE
    except ValueError as exc:
        if not command.reads_user_files:
            raise
        # A dataset or file that does not suit the command (the message names it).
        _report(exc)
        return EXIT_USAGE
    except Exception as exc:
        problem = _resource_problem(exc)
        if problem is None:
            raise  # a bug: the traceback says where
        _report(VlframeError(problem))
        return EXIT_USAGE


def _report(exc: BaseException) -> None:
    lines = exc.lines() if isinstance(exc, VlframeError) else [str(exc)]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    if debugging():
        traceback.print_exception(exc, file=sys.stderr)


def _resource_problem(exc: BaseException) -> str | None:
    """A full disk, or a file the system refuses, in one line (None for anything else)."""
    from vlframe.runs.checkpoint import free_space, no_space

    where = getattr(exc, "filename", None)
    if no_space(exc):
        place = f" writing {where}" if where else ""
        free = f" ({free_space(Path(where)) / 2**20:.0f} MiB free there)" if where else ""
        return f"no space left on the device{place}{free}: free some space and run the command again"
    if isinstance(exc, PermissionError):
        return f"permission denied: {where or exc}"
    if isinstance(exc, OSError) and where:
        return f"{where}: {exc.strerror or exc}"
    return None


if __name__ == "__main__":
    sys.exit(main())

"""``vlframe plugins list|check``: what the registry holds, and whether it keeps the contract."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from registry import ConfigError, Kind, Problem, Registry, debugging
from vlframe.commands.base import EXIT_USAGE, Command, table


class List(Command):
    group, name, help = "plugins", "list", "every registered component with its kind and source"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--kind", choices=[k.value for k in Kind], help="only this kind")
        parser.add_argument("--plugins", action="store_true",
                            help="list the loaded plugins instead: distribution, module, what each provides")

    def run(self, args: argparse.Namespace) -> int:
        registry = Registry.discover()
        table(self._plugins(registry) if args.plugins else self._components(registry, args.kind))
        return 0

    def _plugins(self, registry: Registry) -> list[tuple[str, ...]]:
        rows = [("PLUGIN", "DISTRIBUTION", "MODULE", "PROVIDES")]
        for info in registry.plugins():
            if info.provides:
                provides = ", ".join(info.provides)
            elif info.hooks:
                provides = f"nothing: its hooks ({', '.join(info.hooks)}) return no component"
            else:
                provides = "nothing: it implements no vlframe hook (is @hookimpl missing?)"
            if info.problems:
                provides += f"; could not provide: {' | '.join(info.problems)}"
            rows.append((info.name, info.distribution or "-", info.module, provides))
        for name, reason in sorted(registry.blocked().items()):
            rows.append((name, "-", "-", f"blocked by {reason}"))
        return rows

    def _components(self, registry: Registry, kind_name: str | None) -> list[tuple[str, ...]]:
        kind = Kind(kind_name) if kind_name else None
        catalog = registry.catalog
        rows = [("KIND", "NAME", "PLUGIN", "DISTRIBUTION", "SUMMARY")]
        for entry in catalog.entries(kind):
            summary = entry.spec.summary + (f" (replaces {entry.replaces}'s)" if entry.replaces else "")
            rows.append((entry.kind.value, entry.spec.name, entry.plugin, entry.distribution or "-", summary))
        for (k, name), entries in sorted(catalog.contested().items()):
            if kind is None or k is kind:
                rows.append((k.value, name, " & ".join(e.plugin for e in entries), "-",
                             f"contested: choose with plugins.override: {{{k.value}.{name}: PLUGIN}}"))
        for broken in catalog.broken:
            if kind is None or broken.kind is kind:
                rows.append((broken.kind.value, broken.name or "-", broken.plugin, "-", f"unusable: {broken.message}"))
        return rows


class Check(Command):
    group, name, help = "plugins", "check", "run the conformance checks on components (vlframe.testing)"

    def arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("names", nargs="*", metavar="NAME",
                            help="component names, KIND.NAME, or plugin names (default: every component)")
        parser.add_argument("--config", type=Path, help="a YAML block to build the (one) named component from")

    def run(self, args: argparse.Namespace) -> int:
        from vlframe import testing

        registry = Registry.discover()
        cases = testing.select(registry, args.names)
        override = None
        if args.config is not None:
            if len(cases) != 1:
                raise ConfigError([Problem("--config", f"names {len(cases)} components; name exactly one to use it")])
            from vlframe.config.files import read_yaml

            override = read_yaml(args.config)
        failed = skipped = 0
        for case in cases:
            result = testing.check(registry, case, config=override)
            label = f"{case.kind.value} {case.name} [{case.plugin}]"
            if result:
                failed += 1
                for problem in result:
                    print(f"FAIL {label}: {problem}")
                if debugging():  # the tracebacks the one-line problems stand for
                    for error in result.errors:
                        traceback.print_exception(error, file=sys.stderr)
            elif result.skipped:
                skipped += 1
                print(f"skip {label}: {result.skipped}")
            else:
                print(f"ok   {label}")
        print(f"{len(cases) - failed - skipped} of {len(cases)} component(s) conform, {failed} do not, "
              f"{skipped} skipped")
        return EXIT_USAGE if failed else 0


COMMANDS = [List(), Check()]

"""Errors raised by the registry and by configuration loading.

Every error here is a *user* error: the CLI prints its lines and exits with code 2, without a
traceback. Messages name what is wrong and where (config path, file, plugin, distribution).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Set to 1 for full tracebacks of plugin failures (the CLI's ``--debug`` sets it too).
ENV_DEBUG = "VLFRAME_DEBUG"
DEBUG_HINT = "run with --debug (or VLFRAME_DEBUG=1) for the traceback"


def debugging() -> bool:
    """Whether tracebacks were asked for (``--debug`` or ``VLFRAME_DEBUG=1``)."""
    return os.environ.get(ENV_DEBUG, "").strip().lower() in {"1", "true", "yes", "on"}


def in_one_line(exc: BaseException | str, limit: int = 300) -> str:
    """An exception's message (or any text) on one line, at most ``limit`` characters: library
    messages span lines (torch's, safetensors'), and vlframe says one problem on one line."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = 300, *, hint: bool = True) -> str:
    """``TypeError: message`` on one line, with (``hint``) the way to ask for the traceback unless
    it was asked for: how an unexpected exception (a plugin's, a library's) is reported."""
    first = in_one_line(exc, limit)
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if debugging() or not hint else f"{text} ({DEBUG_HINT})"


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class VlframeError(Exception):
    """Base class of every error vlframe reports to its user as plain lines."""

    def lines(self) -> list[str]:
        return [str(self)]


class PluginError(VlframeError):
    """A plugin could not be loaded, registered or trusted (bad hook, bad spec)."""


class PluginLoadError(PluginError):
    """An entry point failed to import."""


class DuplicateComponentError(PluginError):
    """Two plugins registered a component of the same kind under the same name."""


class UnknownComponentError(VlframeError, LookupError):
    """A component name was asked for that no plugin registered."""


class BuildError(VlframeError):
    """A component factory refused the configuration it was given."""


class ComponentError(VlframeError):
    """A plugin's component failed while it ran (its traceback is the error's cause)."""


class CapabilityError(VlframeError):
    """A model lacks a capability that what was asked needs (see
    :func:`registry.protocols.require_capabilities`)."""


@dataclass(frozen=True)
class Problem:
    """One problem in a configuration: where it is (file and dotted path) and what is wrong;
    ``code`` says what kind of problem it is, for programs (pydantic's error type, e.g.
    ``vlframe_unknown_component``: :data:`registry.config.UNKNOWN_COMPONENT`), never to be read
    out of the message."""

    path: str
    message: str
    file: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"


class ConfigError(VlframeError):
    """One or more problems in a configuration, each reported on its own line."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]

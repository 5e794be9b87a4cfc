"""The typed record every component hook returns."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from registry.config import ComponentConfig

C = TypeVar("C", bound=ComponentConfig)

_NAME = re.compile(r"^[a-z][a-z0-9_.\-]*$")


@dataclass(frozen=True)
class ComponentSpec(Generic[C]):
    """One component a plugin offers.

    ``name`` is what a config's ``type`` key selects; ``config`` validates the rest of that
    block; ``factory(config, **kwargs)`` builds the component (the keyword arguments each kind
    receives are documented on its hook in :mod:`registry.hookspecs`, and what it must return in
    :mod:`registry.protocols`); ``summary`` is one line for ``vlframe plugins list``.

    ``example`` (optional) is a config block the conformance kit (``vlframe plugins check``,
    ``vlframe.testing``) builds the component from, for components whose config has required
    fields or, for a model builder, a small complete model. Without one the kit uses
    ``{"type": name}``.
    """

    name: str
    config: type[C]
    factory: Callable[..., Any]
    summary: str
    example: Mapping[str, Any] | None = None

    def problems(self, base: type[ComponentConfig]) -> list[str]:
        """What is wrong with this spec, as messages (empty when it is sound)."""
        found = []
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            found.append(
                f"name {self.name!r} must be lower-case letters, digits, '_', '.' or '-', "
                "starting with a letter"
            )
        if not (isinstance(self.config, type) and issubclass(self.config, base)):
            found.append(f"config must be a subclass of {base.__module__}.{base.__qualname__}")
        if not callable(self.factory):
            found.append("factory is not callable")
        if not isinstance(self.summary, str) or not self.summary.strip() or "\n" in self.summary:
            found.append("summary must be one non-empty line")
        if self.example is not None and not isinstance(self.example, Mapping):
            found.append("example must be a mapping (a config block)")
        elif self.example is not None and self.example.get("type", self.name) != self.name:
            found.append(f"example's type {self.example.get('type')!r} is not this component's name {self.name!r}")
        return found

"""Names a package exports but loads on first use: written once, for ``vlframe`` and ``vlframe.sdk``.

    __getattr__, __dir__ = lazy(__name__, {"Attention": "vlframe.nn.attention", ...})

so that importing the package stays cheap (``vlframe.nn`` with torch alone on a GPU machine, a
plugin without pydantic or MLflow until it needs them). A name that moved elsewhere keeps working
through :func:`moved`: it warns once, saying where it went.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy(module: str, exports: Mapping[str, str],
         moved: Mapping[str, tuple[str, str]] | None = None) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``module``: each name of ``exports`` is imported from the module
    it maps to on first use (then kept in the module's namespace); each of ``moved`` (old name ->
    (new module, new name)) warns once and gives the new object."""
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
        elif name in moved:
            target, new_name = moved[name]
            warnings.warn(f"{module}.{name} moved: import {new_name} from {target} (see CHANGELOG.md)",
                          DeprecationWarning, stacklevel=2)
            value = getattr(importlib.import_module(target), new_name)
        else:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        setattr(sys.modules[module], name, value)  # later lookups skip this function (and warn no more)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


__all__ = ["lazy"]

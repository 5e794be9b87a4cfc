"""Names a package exports but loads on first use, and names that moved: written once.

    __getattr__, __dir__ = lazy(__name__, {"Attention": "vlframe.nn.attention", ...})

so that importing the package stays cheap (``vlframe.nn`` with torch alone on a GPU machine, a
plugin without pydantic or MLflow until it needs them). A name that moved keeps working where it
was: an attribute through ``lazy(..., moved=...)``, a whole module through :data:`MOVED_MODULES`
(installed by ``vlframe/__init__``); each warns once, saying where it went (CHANGELOG.md says how
to migrate).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

#: Modules plugins and scripts imported before the engine was grouped into subpackages (and before
#: ``vlframe.sdk`` existed), and where each went. ``import vlframe.distributed`` still works.
MOVED_MODULES = {
    "vlframe.distributed": "vlframe.runtime.distributed",
    "vlframe.datasets": "vlframe.data.samples",
    "vlframe.generation": "vlframe.inference.generation",
    "vlframe.pretrained": "vlframe.inference.trained",
    "vlframe.caption_metrics": "vlframe.evaluation.caption_metrics",
    "vlframe.zeroshot": "vlframe.evaluation.zeroshot",
    "vlframe.metrics": "vlframe.evaluation.metrics",
    "vlframe.checkpoint": "vlframe.runs.checkpoint",
    "vlframe.tracking": "vlframe.runs.tracking",
    "vlframe.configfile": "vlframe.config.files",
    "vlframe.schema": "vlframe.config.schema",
    "vlframe.shards": "vlframe.interchange.shard_writer",
    "vlframe.convert": "vlframe.interchange.convert",
    "vlframe.comparison": "vlframe.sweeps.comparison",
    "vlframe.optim": "vlframe.training.optim",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds each old module name of :data:`MOVED_MODULES` and gives the module it moved to."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec: Any) -> Any:
        new = MOVED_MODULES[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; a plugin imports these names from vlframe.sdk "
                      "(see CHANGELOG.md)", FutureWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._own_spec = module.__spec__  # the import machinery sets the old name's spec on it next
        return module

    def exec_module(self, module: Any) -> None:
        """The module is already whole: give it its own spec back (``importlib.reload`` reads it)."""
        module.__spec__ = self._own_spec


def install_moved_modules() -> None:
    """Put the finder of moved modules first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())


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
            # FutureWarning: shown to whoever runs the code, not only to its author's tests.
            warnings.warn(f"{module}.{name} moved: import {new_name} from {target} (see CHANGELOG.md)",
                          FutureWarning, stacklevel=2)
            value = getattr(importlib.import_module(target), new_name)
        else:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        setattr(sys.modules[module], name, value)  # later lookups skip this function (and warn no more)
        return value

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__


__all__ = ["MOVED_MODULES", "install_moved_modules", "lazy"]

"""Import paths that moved when the package was laid out by layers (issue 35), kept working for one release.

``import editing.sweep`` (or any other module that used to sit at the top of ``editing/``) still works: a finder
installed by ``editing/__init__.py`` answers the old name with the module at its new place (the same module object,
so a monkeypatch through either name is seen by both) and warns once with a ``FutureWarning`` naming the new path.
``editing.edits`` is a folder now; the names of the old ``editing.edits`` module are answered by
:func:`moved_attribute`. This table is the only place that knows the old names; drop it in the next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

MOVED: dict[str, str] = {
    "editing.errors": "editing.core.errors", "editing.types": "editing.core.types",
    "editing.paths": "editing.core.paths", "editing.files": "editing.core.files",
    "editing.textfiles": "editing.core.textfiles", "editing.digests": "editing.core.digests",
    "editing.interruption": "editing.core.interruption",
    "editing.cache_files": "editing.caches.entries", "editing.cache_keys": "editing.caches.keys",
    "editing.cache_contents": "editing.caches.contents",
    "editing.budget": "editing.rules.budget", "editing.tasks": "editing.rules.tasks",
    "editing.losses": "editing.rules.losses",
    "editing.records": "editing.runs.records", "editing.tables": "editing.runs.tables",
    "editing.console": "editing.runs.console", "editing.run_folder": "editing.runs.run_folder",
    "editing.metrics_log": "editing.runs.metrics_log", "editing.checkpoints": "editing.runs.checkpoints",
    "editing.integrity": "editing.runs.manifest",
    "editing.regularizers": "editing.methods.regularizers",
    "editing.combined": "editing.edits.combine",
    "editing.sweep": "editing.protocol.sweep", "editing.report": "editing.protocol.report",
    "editing.auto": "editing.protocol.auto", "editing.ensemble_search": "editing.protocol.ensemble_search",
}
"""Old dotted module name -> its new one."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old import path works until the next release. Import {new} instead.",
                  FutureWarning, stacklevel=3)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        # the module is the new one, already executed; binding the old name to it is all that is left
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name of :data:`MOVED` and loads the module at its new path under it."""

    def find_spec(self, fullname: str, path, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        _warn(fullname, new)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())


def moved_attribute(package: str, new_module: str) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for a package that replaced a module of the same name.

    Args:
        package: The package's dotted name (the old module's name).
        new_module: Where the old module's contents live now.

    Returns:
        A function that answers a public name of ``new_module`` with a FutureWarning, and raises AttributeError for
        anything else.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        module = importlib.import_module(new_module)
        if not hasattr(module, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        _warn(f"{package}.{name}", f"{new_module}.{name}")
        return getattr(module, name)

    return __getattr__

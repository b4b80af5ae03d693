"""Import paths that moved when the package was laid out by layers (issue 35), kept working for one release.

``import editing.sweep`` (or any other module that used to sit at the top of ``editing/``) still works: a finder
installed by ``editing/__init__.py`` answers the old name with the module at its new place (the same module object,
so a monkeypatch through either name is seen by both) and warns once with a ``FutureWarning`` naming the new path.
An old module whose names were split between several new modules (``editing.sweep``: search spaces, storage, trials,
the sweep, selection, test runs) is answered by a module of its own whose PEP 562 ``__getattr__`` gives each name
from the first new module that has it, with a FutureWarning naming that module (a monkeypatch must then go to the
new module, where the name is looked up).
``editing.edits`` is a folder now; the names of the old ``editing.edits`` module are answered by the same
:func:`split_attribute`, with one new module. This table is the only place that knows the old names; drop it in the
next release.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

MOVED: dict[str, str | tuple[str, ...]] = {
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
    "editing.sweep": ("editing.protocol.space", "editing.protocol.storage", "editing.protocol.trials",
                      "editing.protocol.sweep", "editing.protocol.select", "editing.protocol.test_runs"),
    "editing.report": "editing.protocol.report",
    "editing.auto": "editing.protocol.auto", "editing.ensemble_search": "editing.protocol.ensemble_search",
}
"""Old dotted module name -> its new one, or the new ones its names went to (searched in this order)."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; the old import path works until the next release. Import {new} instead.",
                  FutureWarning, stacklevel=3)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the module is the new one, already executed; binding the old name to it is all that is left, but the import
        # system has just given it the old name's spec: give back its own (its name, for reload and pickling)
        module.__spec__ = self.spec


class _SplitAlias(importlib.abc.Loader):
    def __init__(self, old: str, new: tuple[str, ...]):
        self.old, self.new = old, new

    def create_module(self, spec):
        return None  # a plain module, filled by exec_module

    def exec_module(self, module) -> None:
        module.__doc__ = f"{self.old} moved to {', '.join(self.new)} (answered from the first that has a name)."
        module.__getattr__ = split_attribute(self.old, self.new)
        module.__dir__ = lambda: sorted({n for m in self.new for n in dir(importlib.import_module(m))
                                         if not n.startswith("__")})


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name of :data:`MOVED` and loads the module at its new path under it."""

    def find_spec(self, fullname: str, path, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        if isinstance(new, tuple):
            _warn(fullname, ", ".join(new))
            return importlib.util.spec_from_loader(fullname, _SplitAlias(fullname, new))
        _warn(fullname, new)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedFinder())


def split_attribute(old: str, new_modules: Sequence[str]) -> Callable[[str], Any]:
    """A PEP 562 ``__getattr__`` for an old module whose names went to several new modules.

    Args:
        old: The old module's dotted name.
        new_modules: The new modules, searched in order: a function or class is answered from the module that defines
            it, any other name from the first module that has it.

    Returns:
        A function that answers a name with a FutureWarning naming the new module, and raises AttributeError for a
        name none of them has. Nothing is cached, so a monkeypatch of the new module is seen through the old name.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        modules = [importlib.import_module(new) for new in new_modules]
        having = [m for m in modules if hasattr(m, name)]
        # a function or class is named by the module that defines it (the others may import it); a constant by the
        # first module that has it
        defining = [m for m in having if getattr(getattr(m, name), "__module__", None) == m.__name__]
        for module in defining or having[:1]:
            _warn(f"{old}.{name}", f"{module.__name__}.{name}")
            return getattr(module, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r} (its names moved to {', '.join(new_modules)})")

    return __getattr__

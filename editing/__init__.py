"""canonical-editing: edit language models from canonical examples (Hewitt et al., 2024).

``from editing import edit, combine, load_edited`` is the Python API (``editing.api``, ``editing.edits.load``); it is
imported on first use, so that importing the package (and ``editing --help``) stays cheap. The folders of the
package are its layers, lowest first: core, caches, rules, runs, data, models, evaluation, methods, edits, protocol,
commands (docs/architecture.md).
"""

from editing.core import moved as _moved

__version__ = "0.1.0"

_moved.install()  # old import paths (editing.sweep, editing.combined, ...) keep working for one release

_LAZY = {name: "editing.api" for name in ("edit", "combine", "EditResult", "CombinedResult")}
_LAZY["load_edited"] = "editing.edits.load"


def __getattr__(name: str):
    """``editing.edit`` and the API's other names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editing' has no attribute {name!r}")

"""canonical-editing: edit language models from canonical examples (Hewitt et al., 2024).

``from editing import edit, combine`` is the Python API (``editing.api``); it is imported on first use, so that
importing the package (and ``editing --help``) stays cheap.
"""

__version__ = "0.1.0"

_LAZY = {name: "editing.api" for name in ("edit", "combine", "EditResult", "CombinedResult")}


def __getattr__(name: str):
    """``editing.edit`` and the API's other names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editing' has no attribute {name!r}")

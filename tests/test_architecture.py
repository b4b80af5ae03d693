"""The package's layering (docs/architecture.md): a module imports only from its own layer or a lower one.

The layer order is written once, here. The test reads every module's imports (the AST, so nothing is imported) and
fails on an import from a higher layer; imports under ``if TYPE_CHECKING:`` are type hints only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module's layer is the first entry that is a prefix of its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("editing.errors", "editing.types", "editing.paths", "editing.files", "editing.textfiles",
                "editing.digests", "editing.cache_files", "editing.cache_keys", "editing.interruption",
                "editing.__init__")),
    ("rules", ("editing.budget", "editing.tasks", "editing.losses", "editing.records", "editing.tables",
               "editing.console", "editing.run_folder", "editing.metrics_log", "editing.checkpoints",
               "editing.integrity", "editing.cache_contents")),
    ("data", ("editing.data",)),
    ("models", ("editing.models",)),
    ("evaluation", ("editing.evaluation", "editing.regularizers")),
    ("methods", ("editing.methods",)),
    ("uses methods", ("callbacks", "editing.edits", "editing.ensemble_search", "editing.combined")),
    ("protocol", ("editing.sweep", "editing.report", "editing.auto")),
    ("commands", ("editing.commands",)),
    ("entry", ("editing.cli", "editing.api")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] + (["__init__"] if len(parts) == 2 and parts[0] == "editing" else [])
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name (None for modules outside the package, e.g. torch)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from editing import methods` imports the sub-module editing.methods
            for alias in node.names:
                found.append((node.lineno, f"{name}.{alias.name}"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def package_files() -> list[Path]:
    return sorted([*REPO.joinpath("editing").rglob("*.py"), *REPO.joinpath("callbacks").rglob("*.py")])


def test_every_package_module_has_a_layer():
    missing = [_module_name(p) for p in package_files() if layer_of(_module_name(p)) is None]
    assert not missing, f"modules without a layer (add them to LAYERS and docs/architecture.md): {missing}"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in package_files():
        own = layer_of(_module_name(path))
        for line, name in imports_of(path):
            target = layer_of(name)
            if target is not None and own is not None and target > own:
                violations.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[own][0]}) imports {name} "
                                  f"({LAYERS[target][0]})")
    assert not violations, "imports from a higher layer:\n" + "\n".join(sorted(set(violations)))


@pytest.mark.parametrize("source, expected", [
    ("from editing.cli import main\n", "editing.cli"),
    ("if TYPE_CHECKING:\n    from editing.cli import main\n", None),
    ("import editing.commands.lightning\n", "editing.commands.lightning"),
])
def test_the_import_reader_sees_what_it_should(tmp_path, source, expected):
    path = REPO / "editing" / "_probe_for_test.py"
    try:
        path.write_text("from typing import TYPE_CHECKING\n" + source)
        names = [n for _, n in imports_of(path) if n.startswith("editing")]
    finally:
        path.unlink()
    assert (expected in names) if expected else not names


def test_a_higher_import_is_reported(tmp_path, monkeypatch):
    # a leaf that imports the CLI must be flagged: the check can fail
    path = REPO / "editing" / "errors.py"
    source = path.read_text(encoding="utf-8")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source + "\nfrom editing.cli import main\n"
                        if self == path else Path.read_bytes(self).decode(encoding or "utf-8"))
    with pytest.raises(AssertionError, match="editing/errors.py.*imports editing.cli"):
        test_no_module_imports_from_a_higher_layer()

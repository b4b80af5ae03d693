"""The package's layering (docs/architecture.md): a module imports only from its own layer or a lower one.

The layer order is written once, here. The test reads every module's imports (the AST, so nothing is imported) and
fails on an import from a higher layer; imports under ``if TYPE_CHECKING:`` are type hints only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The layers, lowest first: the order is written here once. A module's layer is its folder: editing/<layer>/...,
# callbacks/ (the design card's top-level folder) and, for the modules at the top of editing/, the entry layer
# (editing/__init__.py, which holds the version and the lazy API names and imports only editing.core, is core).
LAYERS: list[str] = ["core", "caches", "rules", "runs", "data", "models", "evaluation", "methods", "callbacks",
                     "edits", "protocol", "commands", "entry"]
ROOT_MODULE_LAYER = {"editing.__init__": "core"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] + (["__init__"] if len(parts) == 2 and parts[0] == "editing" else [])
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name, from its folder (None outside the package, e.g. torch).

    ``editing.core.files`` -> core; ``callbacks.degradation_budget`` -> callbacks; ``editing.cli`` -> entry. A folder
    of ``editing/`` that is not in LAYERS has no layer (and fails ``test_every_package_module_has_a_layer``).
    """
    parts = module.split(".")
    if parts[0] == "callbacks":
        return LAYERS.index("callbacks")
    if parts[0] != "editing" or len(parts) < 2:
        return None
    if module in ROOT_MODULE_LAYER:
        return LAYERS.index(ROOT_MODULE_LAYER[module])
    folder = parts[1]
    if folder in LAYERS:
        return LAYERS.index(folder)
    if len(parts) == 2 and (REPO / "editing" / f"{folder}.py").is_file():
        return LAYERS.index("entry")  # a module at the top of editing/ (api, cli)
    return None


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
    assert not missing, f"modules in a folder that is not a layer (put them in one, or add the folder to LAYERS and " \
                        f"docs/architecture.md): {missing}"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    for path in package_files():
        own = layer_of(_module_name(path))
        for line, name in imports_of(path):
            target = layer_of(name)
            if target is not None and own is not None and target > own:
                violations.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[own]}) imports {name} "
                                  f"({LAYERS[target]})")
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
    path = REPO / "editing" / "core" / "errors.py"
    source = path.read_text(encoding="utf-8")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source + "\nfrom editing.cli import main\n"
                        if self == path else Path.read_bytes(self).decode(encoding or "utf-8"))
    with pytest.raises(AssertionError, match="editing/core/errors.py.*imports editing.cli"):
        test_no_module_imports_from_a_higher_layer()


@pytest.mark.parametrize("module, folder", [("runs/records.py", "core"), ("protocol/auto.py", "runs"),
                                            ("methods/base.py", "evaluation")])
def test_a_module_moved_into_a_lower_folder_fails_the_layer_test(module, folder):
    # the layer is the folder: the same source one floor down imports from above its layer
    probe = REPO / "editing" / folder / "_probe_moved_for_test.py"
    try:
        probe.write_text((REPO / "editing" / module).read_text(encoding="utf-8"), encoding="utf-8")
        where = f"editing/{folder}/_probe_moved_for_test.py:\\d+ \\({folder}\\) imports"
        with pytest.raises(AssertionError, match=where):
            test_no_module_imports_from_a_higher_layer()
    finally:
        probe.unlink()


def test_a_folder_that_is_not_a_layer_fails():
    folder = REPO / "editing" / "_misc_for_test"
    folder.mkdir()
    try:
        (folder / "helpers.py").write_text("X = 1\n")
        with pytest.raises(AssertionError, match="editing._misc_for_test.helpers"):
            test_every_package_module_has_a_layer()
    finally:
        (folder / "helpers.py").unlink()
        folder.rmdir()


def test_the_layer_of_a_module_is_its_folder():
    assert [LAYERS[layer_of(m)] for m in ("editing.core.files", "editing.caches.keys", "editing.runs.records",
                                          "editing.methods.lora.module", "callbacks.degradation_budget",
                                          "editing.protocol.sweep", "editing.cli", "editing.__init__")] == [
        "core", "caches", "runs", "methods", "callbacks", "protocol", "entry", "core"]
    assert layer_of("torch.nn") is None and layer_of("editing") is None


def test_no_two_modules_import_each_other():
    # a cycle through function-level imports too (editing.methods.base and .registry once imported each other);
    # a package's __init__ re-exporting its own modules is not a cycle of trades, so packages are left out
    graph: dict[str, set[str]] = {}
    modules = [p for p in package_files() if p.name != "__init__.py"]
    names = {_module_name(p) for p in modules}
    for path in modules:
        graph[_module_name(path)] = {n for _, n in imports_of(path) if n in names and n != _module_name(path)}
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
    assert not pairs, f"modules that import each other: {pairs}"


# A function longer than this many lines (decorators excluded) gives the reason in its docstring (issue 35).
LONG_FUNCTION_LINES = 60


def long_functions_without_a_reason(paths: list[Path], root: Path = REPO) -> list[str]:
    """``file:line name length`` of every function or method over LONG_FUNCTION_LINES lines whose docstring has no
    "Long because"."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > LONG_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} {length}")
    return found


def test_a_long_function_says_why_in_its_docstring():
    # a function over about 60 lines is split into named steps, or its docstring says why it stays one piece
    found = long_functions_without_a_reason(package_files())
    assert not found, (f"functions over {LONG_FUNCTION_LINES} lines without 'Long because' in their docstring "
                       f"(split them, or say why they stay one piece):\n" + "\n".join(found))


def test_the_long_function_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONG_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f'@staticmethod\ndef f():\n    """Short."""\n{body}\n', encoding="utf-8")
    (tmp_path / "ok.py").write_text(f'def g():\n    """Long because a reason.\n    """\n{body}\n', encoding="utf-8")
    (tmp_path / "short.py").write_text('def h():\n    """Short."""\n' + "\n".join(f"    x{i} = {i}" for i in range(
        LONG_FUNCTION_LINES - 2)) + "\n", encoding="utf-8")
    # def + docstring + 60 lines is 62 (the decorator does not count); the 60-line function and the one that says
    # why are not reported
    found = long_functions_without_a_reason(sorted(tmp_path.glob("*.py")), root=tmp_path)
    assert found == [f"long.py:2 f {LONG_FUNCTION_LINES + 2}"]

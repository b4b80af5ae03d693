"""Old import paths (``editing.sweep``, ``editing.combined``, ``from editing.edits import load_edited``) keep working
for one release, with a FutureWarning naming the new place (``editing.core.moved``)."""

from __future__ import annotations

import ast
import importlib
import sys

import pytest

from editing.core import paths


@pytest.mark.parametrize(("name", "new_module"), [
    ("select_best", "editing.protocol.select"),
    ("parse_space", "editing.protocol.space"),
    ("make_storage", "editing.protocol.storage"),
    ("run_fit", "editing.protocol.trials"),
    ("run_sweep", "editing.protocol.sweep"),
    ("test_runs", "editing.protocol.test_runs"),
])
def test_an_old_sweep_name_is_the_new_object_with_a_future_warning(name, new_module):
    import editing.sweep

    with pytest.warns(FutureWarning, match=rf"editing\.sweep\.{name} moved to {new_module}\.{name}"):
        old = getattr(editing.sweep, name)
    assert old is getattr(importlib.import_module(new_module), name)


def test_an_old_sweep_name_that_never_was_is_an_attribute_error():
    import editing.sweep

    with pytest.raises(AttributeError, match="no_such_name"):
        editing.sweep.no_such_name  # noqa: B018 - the access is the test


def test_the_old_sweep_module_is_not_one_of_the_new_ones():
    # a module of its own, so that a name of any of the six new modules is answered, not only the first one's
    import editing.sweep

    assert editing.sweep is not importlib.import_module("editing.protocol.sweep")
    names = {"select_best", "make_sampler", "make_storage", "run_fit", "run_sweep", "test_runs"}
    assert names <= set(dir(editing.sweep))


def test_importing_the_old_sweep_path_warns(monkeypatch):
    monkeypatch.delitem(sys.modules, "editing.sweep", raising=False)
    with pytest.warns(FutureWarning, match=r"editing\.sweep moved to editing\.protocol\.space, "):
        importlib.import_module("editing.sweep")


def test_old_combined_and_edits_paths_warn_and_work(monkeypatch):
    from editing.edits.combine import combine_edits
    from editing.edits.load import load_edited

    monkeypatch.delitem(sys.modules, "editing.combined", raising=False)
    with pytest.warns(FutureWarning, match=r"editing\.combined moved to editing\.edits\.combine"):
        from editing.combined import combine_edits as old_combine
    assert old_combine is combine_edits
    with pytest.warns(FutureWarning, match=r"editing\.edits\.load_edited moved to editing\.edits\.load\.load_edited"):
        from editing.edits import load_edited as old_load
    assert old_load is load_edited


def test_config_folders_are_named_by_core_paths():
    # the API and `editing auto` take the shipped configs' folders from core/paths.py, not from the sweep module
    assert (paths.FIT_DIR / "lora.yaml").is_file() and (paths.SPACE_DIR / "lora.yaml").is_file()
    assert paths.FIT_DIR.parent == paths.SPACE_DIR.parent == paths.REPO_DIR / "lightning_configs"
    for source in ("editing/api.py", "editing/protocol/auto.py", "editing/protocol/space.py",
                   "editing/protocol/sweep.py"):
        tree = ast.parse((paths.REPO_DIR / source).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and {"FIT_DIR", "SPACE_DIR"} & {a.name for a in node.names}:
                assert node.module == "editing.core.paths", f"{source}:{node.lineno} imports from {node.module}"

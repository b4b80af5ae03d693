"""``editing data download`` through a ``file://`` mirror of the paper's repository layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from editing.core.errors import EditingError
from editing.data.download import REGULARIZATION_LINES, download, task_files


def _shared_files(data_root: Path) -> list[str]:
    return sorted(str(p.relative_to(data_root).as_posix()) for p in data_root.glob("*/split/*.jsonl"))


@pytest.fixture
def mirror(tmp_path, data_root) -> Path:
    """``<task>/split/*.jsonl`` as in the shared data, plus ``val100-val.jsonl`` = R + G concatenated."""
    root = tmp_path / "mirror"
    for rel in _shared_files(data_root):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(data_root / rel, root / rel)
    general = data_root / "general"
    (root / "val100-val.jsonl").write_bytes(
        (general / "regularization.jsonl").read_bytes() + (general / "degradation.jsonl").read_bytes())
    return root


def test_task_files_cover_the_shared_data(data_root):
    assert task_files() == _shared_files(data_root)
    assert len(task_files()) == 6 * 4 * 2


def test_download_reproduces_the_shared_data(mirror, tmp_path, data_root, capsys):
    out = tmp_path / "out"
    assert download(root=out, base_url="file://" + str(mirror)) == out
    expected = _shared_files(data_root) + ["general/regularization.jsonl", "general/degradation.jsonl"]
    got = sorted(str(p.relative_to(out).as_posix()) for p in out.rglob("*") if p.is_file())
    assert got == sorted(expected)
    for rel in expected:
        assert (out / rel).read_bytes() == (data_root / rel).read_bytes(), rel
    assert len((out / "general" / "regularization.jsonl").read_text().splitlines()) == REGULARIZATION_LINES
    assert "data ready" in capsys.readouterr().err

    # present files are not fetched again: works with the mirror gone
    shutil.rmtree(mirror)
    download(root=out, base_url="file://" + str(mirror))
    # ...but overwrite=True must fetch, and a failing fetch is a clear error naming the URL
    with pytest.raises(EditingError, match=r"could not download file://.*company_ceo/split/.*\.jsonl"):
        download(root=out, base_url="file://" + str(mirror), overwrite=True)
    shared = data_root / "general" / "degradation.jsonl"
    assert (out / "general" / "degradation.jsonl").read_bytes() == shared.read_bytes()


def test_downloaded_root_is_a_usable_data_root(mirror, tmp_path, data_root, monkeypatch):
    from editing.core.paths import resolve_data_root
    from editing.data.datamodule import TaskDataModule

    out = tmp_path / "out"
    download(root=out, base_url="file://" + str(mirror) + "/")  # a trailing slash is fine
    assert resolve_data_root(out) == out
    dm = TaskDataModule(task="verb_conjugation", data_root=str(out))
    assert dm.path("evaluation") == out / "verb_conjugation" / "split" / "verb_conjugation_eval-val.jsonl"
    assert dm.path("general") == out / "general" / "degradation.jsonl"
    # the default download location is the cache folder, which the data-root search also looks in
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))
    assert download(base_url="file://" + str(mirror)) == tmp_path / "cache" / "data"


def test_cli_data_download(mirror, tmp_path, data_root):
    from editing.cli import main

    out = tmp_path / "cli-out"
    main(["data", "download", "--root", str(out), "--base_url", "file://" + str(mirror)])
    for rel in ("stereoset/split/stereoset_hard_neg-test.jsonl", "general/regularization.jsonl",
                "general/degradation.jsonl"):
        assert (out / rel).read_bytes() == (data_root / rel).read_bytes()


def test_general_split_is_by_newlines_only(mirror, tmp_path, data_root):
    """JSON strings may hold raw U+2028 / U+2029 / form feeds: R and G are split on "\\n" only."""
    lines = [f'{{"text": "chunk {i}\u2028with a line separator\x0cand a form feed"}}\n' for i in range(2010)]
    (mirror / "val100-val.jsonl").write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    download(root=out, base_url="file://" + str(mirror))
    assert (out / "general" / "regularization.jsonl").read_text(encoding="utf-8") == "".join(lines[:2000])
    assert (out / "general" / "degradation.jsonl").read_text(encoding="utf-8") == "".join(lines[2000:])

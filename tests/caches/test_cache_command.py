"""`editing cache list` / `editing cache clear`: sizes and ages measured on a cache folder built here, and removal of
exactly the entries asked for (never other kinds, never what a link points at, never files of no kind)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from editing.caches.contents import REMOVING_PREFIX, cache_entries, human_size
from editing.cli import main
from editing.commands.cache import cache_clear, cache_list
from editing.core.errors import ConfigError
from editing.core.types import CacheKind

DAY = 86400.0


def _write(path: Path, size: int, age_days: float = 0.0, read_days: float | None = None) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    now = time.time()
    mtime = now - age_days * DAY
    atime = mtime if read_days is None else now - read_days * DAY
    os.utime(path, (atime, mtime))
    return size


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EDITING_CACHE", str(root))
    monkeypatch.delenv("EDITING_EVAL_CACHE_DIR", raising=False)
    # (kind, entry) -> (bytes, files), written with the ages below
    expected = {
        ("models", "backpack-a"): (_write(root / "models/backpack-a/model.safetensors", 300, 50)
                                   + _write(root / "models/backpack-a/config.json", 20, 50), 2),
        ("models", "smollm2"): (_write(root / "models/smollm2/model.safetensors", 400, 1), 1),
        ("teacher_cache", "old"): (_write(root / "teacher_cache/old/shard-00000.pt", 1000, 40)
                                   + _write(root / "teacher_cache/old/sub/manifest.json", 7, 40), 2),
        ("teacher_cache", "new"): (_write(root / "teacher_cache/new/shard-00000.pt", 900, 2), 1),
        ("evaluation", "p0/old.safetensors"): (_write(root / "evaluation/p0/old.safetensors", 11, 45), 1),
        # written long ago but read yesterday: in use
        ("evaluation", "p0/read.safetensors"): (_write(root / "evaluation/p0/read.safetensors", 13, 45, 1), 1),
        ("evaluation", "prefix/key1"): (_write(root / "evaluation/prefix/key1/general_0.safetensors", 50, 60)
                                        + _write(root / "evaluation/prefix/key1/general_1.safetensors", 60, 60), 2),
        ("memit_stats", "fp"): (_write(root / "memit_stats/fp/layer1.safetensors", 70, 5), 1),
    }
    _write(root / "my-notes.txt", 5, 100)  # not a cache of the package
    return root, expected


def test_list_measures_every_entry(cache, capsys):
    root, expected = cache
    found = {(e.kind.value, e.name): (e.size, e.files) for e in cache_entries()}
    assert found == expected

    rows = {row["kind"]: row for row in cache_list()}
    assert list(rows) == [k.value for k in CacheKind]
    for kind in CacheKind:
        mine = [v for (k, _), v in expected.items() if k == kind.value]
        assert rows[kind.value]["entries"] == len(mine)
        assert rows[kind.value]["bytes"] == sum(size for size, _ in mine)
    out = capsys.readouterr().out
    assert "my-notes.txt" in out and "never removed" in out
    assert f"in {len(expected)} entries" in out

    entry_rows = cache_list(kinds="evaluation", entries=True)
    assert [r["entry"] for r in entry_rows] == ["p0/old.safetensors", "p0/read.safetensors", "prefix/key1"]
    assert [r["bytes"] for r in entry_rows] == [11, 13, 110]


@pytest.mark.parametrize(("size", "shown"), [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (1048575, "1024.0 KiB"),
    (1048576, "1.0 MiB"), (3 * 1048576 + 104858, "3.1 MiB"), (1073741824, "1.0 GiB"),
    (3_224_371_200, "3.0 GiB"), (2048 * 1073741824, "2048.0 GiB"),
])
def test_sizes_are_shown_in_binary_units(size, shown):
    # worked out by hand: 1 KiB = 1024 B, one decimal, rounded; GiB is the largest unit
    assert human_size(size) == shown


def test_clear_removes_exactly_the_old_entries_of_the_kinds_named(cache):
    root, expected = cache
    before = {(e.kind.value, e.name) for e in cache_entries()}

    dry = cache_clear(kinds="teacher_cache,evaluation", older_than_days=30, dry_run=True)
    doomed = {("teacher_cache", "old"), ("evaluation", "p0/old.safetensors"), ("evaluation", "prefix/key1")}
    assert {(r["kind"], r["entry"]) for r in dry} == doomed
    assert {(e.kind.value, e.name) for e in cache_entries()} == before  # a dry run removes nothing

    rows = cache_clear(kinds="teacher_cache,evaluation", older_than_days=30)
    assert {(r["kind"], r["entry"]) for r in rows} == doomed
    assert {(e.kind.value, e.name) for e in cache_entries()} == before - doomed
    assert (root / "evaluation/p0/read.safetensors").is_file()  # read yesterday
    assert (root / "models/backpack-a/model.safetensors").is_file()  # another kind, however old
    assert (root / "my-notes.txt").is_file()
    assert not [p for p in root.rglob("*") if p.name.startswith(REMOVING_PREFIX)]

    cache_clear(kinds="evaluation")  # no age: every entry of the kind
    assert not [e for e in cache_entries() if e.kind is CacheKind.EVALUATION]
    assert (root / "teacher_cache/new/shard-00000.pt").is_file()


def test_models_are_removed_only_by_name(cache):
    root, _ = cache
    with pytest.raises(ConfigError, match="--names"):
        cache_clear(kinds="models")
    cache_clear(kinds="models", names="smollm2")
    assert not (root / "models/smollm2").exists()
    assert (root / "models/backpack-a/model.safetensors").is_file()


def test_a_linked_entry_is_unlinked_not_followed(cache, tmp_path):
    root, _ = cache
    outside = tmp_path / "elsewhere" / "precious"
    _write(outside / "weights.bin", 64)
    (root / "models" / "linked").symlink_to(outside, target_is_directory=True)
    linked = [e for e in cache_entries([CacheKind.MODELS]) if e.name == "linked"]
    assert [(e.size, e.files) for e in linked] == [(0, 1)]
    cache_clear(kinds="models", names="linked")
    assert not (root / "models" / "linked").exists()
    assert (outside / "weights.bin").read_bytes() == b"x" * 64

    # a link inside an entry: counted as one file of no bytes, and deleting the entry leaves its target alone
    (root / "models" / "backpack-a" / "shared").symlink_to(outside, target_is_directory=True)
    entry = next(e for e in cache_entries([CacheKind.MODELS]) if e.name == "backpack-a")
    assert (entry.size, entry.files) == (320, 3)
    cache_clear(kinds="models", names="backpack-a")
    assert not (root / "models" / "backpack-a").exists()
    assert (outside / "weights.bin").read_bytes() == b"x" * 64


def test_a_removal_left_half_done_is_finished_by_the_next_clear(cache):
    root, _ = cache
    leftover = root / "teacher_cache" / f"{REMOVING_PREFIX}abc-12345678"
    _write(leftover / "shard-00001.pt", 10)
    cache_clear(kinds="teacher_cache", names=leftover.name)
    assert not leftover.exists()
    assert (root / "teacher_cache/new").is_dir()


def test_the_evaluation_caches_follow_their_own_folder(cache, tmp_path, monkeypatch):
    from editing.evaluation.caching import cache_root

    elsewhere = tmp_path / "eval-cache"
    monkeypatch.setenv("EDITING_EVAL_CACHE_DIR", str(elsewhere))
    _write(elsewhere / "p0" / "k.safetensors", 17)
    assert cache_root() == elsewhere  # the caches and the command agree on the folder
    assert [(e.name, e.size) for e in cache_entries([CacheKind.EVALUATION])] == [("p0/k.safetensors", 17)]
    cache_clear(kinds="evaluation")
    assert not (elsewhere / "p0" / "k.safetensors").exists()
    assert (cache[0] / "evaluation/p0/old.safetensors").is_file()


@pytest.mark.parametrize(("args", "message"), [
    ({}, "needs --kinds"),
    ({"kinds": " , "}, "needs --kinds"),
    ({"kinds": "evaluaton"}, "unknown cache kind 'evaluaton'; expected one of models, tokenizers"),
    ({"kinds": "evaluation", "names": "p0/nope"}, "--names p0/nope: no such cache entry"),
    ({"kinds": "evaluation", "older_than_days": -1}, "--older_than_days -1"),
])
def test_clear_refuses_what_it_cannot_do_and_removes_nothing(cache, args, message):
    before = cache_entries()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cache_clear(**args)
    assert cache_entries() == before


def test_the_commands_run_from_the_command_line(cache, capsys):
    root, _ = cache
    main(["cache", "list", "--kinds", "teacher_cache", "--entries", "true"])
    out = capsys.readouterr().out
    assert "| teacher_cache | new | 900 B | 1 |" in out
    main(["cache", "clear", "--kinds", "teacher_cache", "--older_than_days", "30"])
    assert "removed 1 entries, 1007 B" in capsys.readouterr().out
    assert not (root / "teacher_cache/old").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["cache", "clear", "--kinds", "nope"])
    assert exit_info.value.code == 2
    assert "unknown cache kind 'nope'" in capsys.readouterr().err


def _pin(path: Path, pinned: bool) -> None:
    """Make ``path`` (a file) impossible to unlink, or undo it: immutable for root (which ignores permissions),
    else a read-only parent folder."""
    import shutil
    import subprocess

    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i" if pinned else "-i", str(path)],
                                                        capture_output=True).returncode:
            pytest.skip("root, and chattr cannot pin a file here")
    else:
        path.parent.chmod(0o500 if pinned else 0o700)


def test_an_entry_that_cannot_be_removed_is_named_and_the_others_are_removed(cache):
    from editing.core.errors import EditingError

    root, _ = cache
    _pin(root / "teacher_cache" / "old" / "sub" / "manifest.json", True)
    try:
        with pytest.raises(EditingError, match="could not remove 1 cache entries .*teacher_cache/.removing-old-"):
            cache_clear(kinds="teacher_cache")
        assert not (root / "teacher_cache" / "new").exists()
    finally:
        for stuck in (root / "teacher_cache").glob(f"{REMOVING_PREFIX}old-*/sub/manifest.json"):
            _pin(stuck, False)
    cache_clear(kinds="teacher_cache")  # the next clear finishes the half-removed entry
    assert not list((root / "teacher_cache").iterdir())

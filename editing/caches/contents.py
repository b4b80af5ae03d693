"""What the project's cache folder holds, and removing parts of it (``editing cache list`` / ``editing cache clear``).

Every cache of the package lives in one sub-folder of ``editing.core.paths.cache_dir()`` per ``CacheKind`` (the
evaluation caches in ``$EDITING_EVAL_CACHE_DIR`` when it is set). An *entry* is one thing a cache keys: a child of the
kind's folder (a model folder, a teacher cache, a MEMIT statistics folder per model), or for the evaluation caches a
child of each sub-folder (``p0/<key>.safetensors``, ``prefix/<key>``). Nothing here reads or interprets an entry; it
only measures and removes whole entries, so a new cache needs no code here beyond its kind.

Why entries are renamed before they are deleted: a reader then sees a whole entry or none (an entry missing is a cache
miss everywhere in the package, and the work is redone), never a half-deleted folder that still looks usable.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from editing.core.errors import ConfigError
from editing.core.paths import cache_dir, evaluation_cache_dir
from editing.core.types import CacheKind

REMOVING_PREFIX = ".removing-"
"""Name prefix of an entry being removed (one left by an interrupted removal is removed by the next clear)."""


@dataclass(frozen=True)
class StoredEntry:
    """One cached thing on disk."""

    kind: CacheKind
    name: str
    """Its name inside the kind's folder (``p0/<key>.safetensors`` for an evaluation cache)."""
    path: Path
    size: int
    """Bytes of its files (links are not followed and count nothing)."""
    files: int
    last_used: float
    """The latest time (seconds since the epoch) any of its files was written or read: the later of modification
    and access time, so reads count where the file system keeps access times (``relatime``: to about a day)."""

    @property
    def age_days(self) -> float:
        """Days since ``last_used``."""
        return max(0.0, (time.time() - self.last_used) / 86400.0)


def kind_folder(kind: CacheKind) -> Path:
    """The folder that holds ``kind``'s entries."""
    kind = CacheKind(kind)
    return evaluation_cache_dir() if kind is CacheKind.EVALUATION else cache_dir() / kind.value


def parse_kinds(text: str | None) -> list[CacheKind]:
    """Cache kinds from a comma-separated string; None or a blank list gives every kind.

    Raises:
        ConfigError: an unknown name (the message lists the kinds).
    """
    kinds = [CacheKind(name.strip()) for name in (text or "").split(",") if name.strip()]
    return list(dict.fromkeys(kinds)) or list(CacheKind)


def _measure(path: Path) -> tuple[int, int, float]:
    """(bytes, files, last use) of a file or folder, without following links."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return (0 if path.is_symlink() else st.st_size), 1, max(st.st_mtime, st.st_atime)
    # the files' times only: listing a folder (this walk included) changes the folder's own access time
    size, files, last = 0, 0, 0.0
    for root, dirs, names in os.walk(path, followlinks=False):
        for name in names + dirs:  # os.walk lists a link to a folder among dirs and does not enter it
            try:
                sub = os.lstat(os.path.join(root, name))
            except FileNotFoundError:  # removed while we walk: it is no longer part of the entry
                continue
            if stat.S_ISDIR(sub.st_mode):
                continue
            files += 1
            size += 0 if stat.S_ISLNK(sub.st_mode) else sub.st_size
            last = max(last, sub.st_mtime, sub.st_atime)
    return size, files, (last if files else st.st_mtime)


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def cache_entries(kinds: Iterable[CacheKind] | None = None) -> list[StoredEntry]:
    """The entries of ``kinds`` (every kind when None), sorted by kind and name."""
    entries = []
    for kind in (list(CacheKind) if kinds is None else [CacheKind(k) for k in kinds]):
        folder = kind_folder(kind)
        tops = _children(folder)
        if kind is CacheKind.EVALUATION:  # one level more: p0/, prefix/, senses/, memit_targets/
            tops = [child for top in tops
                    for child in (_children(top) if top.is_dir() and not top.is_symlink() else [top])]
        for path in tops:
            try:
                size, files, last = _measure(path)
            except FileNotFoundError:
                continue
            entries.append(StoredEntry(kind, path.relative_to(folder).as_posix(), path, size, files, last))
    return entries


def other_items() -> list[Path]:
    """Things in the cache folder that belong to no kind (listed, never removed)."""
    known = {kind.value for kind in CacheKind}
    return [p for p in _children(cache_dir()) if p.name not in known]


def remove_entry(entry: StoredEntry) -> bool:
    """Remove one entry: rename it aside in its folder, then delete it (a link is removed, never followed).

    Returns:
        False when it was already gone (another process removed it).

    Raises:
        OSError: a part could not be deleted; the message names the renamed folder that holds the rest.
    """
    path = entry.path
    if path.name.startswith(REMOVING_PREFIX):
        aside = path
    else:
        aside = path.with_name(f"{REMOVING_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink(missing_ok=True)
    except OSError as err:  # name where the rest now lies, not only the file that failed
        raise OSError(err.errno, f"{err.strerror} ({err.filename}); what is left is {aside}") from err
    return True


def select_entries(entries: Iterable[StoredEntry], older_than_days: float | None = None,
                   names: Iterable[str] | None = None) -> list[StoredEntry]:
    """The entries not used for more than ``older_than_days`` days and, when ``names`` is given, named in it.

    Raises:
        ConfigError: a negative age, or a name that matches no entry of the kinds asked for.
    """
    entries = list(entries)
    if older_than_days is not None and not older_than_days >= 0:
        raise ConfigError(f"--older_than_days {older_than_days}: give a number of days >= 0")
    if names is not None:
        names = [n.strip() for n in names if n.strip()]
        known = {e.name for e in entries}
        missing = [n for n in names if n not in known]
        if missing:
            raise ConfigError(f"--names {','.join(missing)}: no such cache entry among "
                              f"{', '.join(sorted(known)) or 'none'} (see `editing cache list --entries true`)")
        entries = [e for e in entries if e.name in names]
    if older_than_days is not None:
        entries = [e for e in entries if e.age_days > older_than_days]
    return entries


def human_size(size: int) -> str:
    """``size`` bytes as B, KiB, MiB or GiB with one decimal."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


__all__ = ["REMOVING_PREFIX", "StoredEntry", "cache_entries", "human_size", "kind_folder", "other_items",
           "parse_kinds", "remove_entry", "select_entries"]

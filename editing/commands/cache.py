"""``editing cache list`` and ``editing cache clear``: what the cache folder holds, and freeing its space."""

from __future__ import annotations

import time

from editing.core.errors import ConfigError, EditingError
from editing.core.types import CacheKind


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _entry_row(entry) -> dict:
    from editing.caches.contents import human_size

    return {"kind": entry.kind.value, "entry": entry.name, "size": human_size(entry.size), "bytes": entry.size,
            "files": entry.files, "last used": _when(entry.last_used)}


def cache_list(kinds: str | None = None, entries: bool = False) -> list[dict]:
    """Show what the cache folder (``$EDITING_CACHE``, else ``~/.cache/canonical-editing``) holds: per kind its
    entries, size and last use; with ``--entries true``, one row per entry.

    Args:
        kinds: comma-separated kinds to show (default: all): models, tokenizers, data, corpus_tokens, teacher_cache,
            memit_stats, sense_background, evaluation.
        entries: one row per entry (e.g. each model folder) instead of one per kind.

    Returns:
        The rows of the table.
    """
    from editing.caches.contents import cache_entries, human_size, kind_folder, other_items, parse_kinds
    from editing.core.paths import cache_dir
    from editing.runs.tables import markdown_table

    chosen = parse_kinds(kinds)
    found = cache_entries(chosen)
    if entries:
        rows = [_entry_row(e) for e in found]
        headers = ["kind", "entry", "size", "files", "last used"]
    else:
        rows = []
        for kind in chosen:
            mine = [e for e in found if e.kind is kind]
            size = sum(e.size for e in mine)
            rows.append({"kind": kind.value, "entries": len(mine), "size": human_size(size), "bytes": size,
                         "last used": _when(max(e.last_used for e in mine)) if mine else "-",
                         "folder": str(kind_folder(kind))})
        headers = ["kind", "entries", "size", "last used", "folder"]
    print(f"cache folder: {cache_dir()}")
    print(markdown_table(headers, [[row[h] for h in headers] for row in rows]))
    total = sum(e.size for e in found)
    print(f"total: {human_size(total)} in {len(found)} entries")
    others = other_items() if kinds is None else []
    if others:
        print("not a cache of this package (never removed by `editing cache clear`): "
              + ", ".join(p.name for p in others))
    return rows


def cache_clear(kinds: str | None = None, names: str | None = None, older_than_days: float | None = None,
                dry_run: bool = False) -> list[dict]:
    """Remove cache entries to free disk space. Everything in the cache is recomputed when next needed (the embedded
    model is dequantized again, a teacher cache refilled), except Backpacks distilled into ``models``, which take
    hours: clearing ``models`` needs the entries named with ``--names``. Do not clear what a running job uses.

    Args:
        kinds: comma-separated kinds to clear (required): tokenizers, data, corpus_tokens, teacher_cache, memit_stats,
            sense_background, evaluation, models.
        names: comma-separated entries to remove (as `editing cache list --entries true` names them); default all
            entries of the kinds.
        older_than_days: only entries not used for more than this many days.
        dry_run: only show what would be removed.

    Returns:
        The rows of the entries removed (or, with ``dry_run``, that would be).
    """
    from editing.caches.contents import (
        REMOVING_PREFIX,
        cache_entries,
        human_size,
        parse_kinds,
        remove_entry,
        select_entries,
    )
    from editing.runs.tables import markdown_table

    if not kinds or not kinds.replace(",", "").strip():  # a blank list is no choice, not "every kind"
        raise ConfigError("`editing cache clear` needs --kinds, e.g. --kinds evaluation,teacher_cache; the kinds are "
                          f"{CacheKind.choices()} (`editing cache list` shows their sizes)")
    chosen = parse_kinds(kinds)
    if CacheKind.MODELS in chosen and not names:
        raise ConfigError("--kinds models holds distilled Backpacks that take hours to make again; name the model "
                          "folders to remove with --names (see `editing cache list --kinds models --entries true`)")
    doomed = select_entries(cache_entries(chosen), older_than_days=older_than_days,
                            names=names.split(",") if names else None)
    rows = [_entry_row(e) for e in doomed]
    removed, failed = [], []
    for entry in doomed:
        try:
            if dry_run or remove_entry(entry):
                removed.append(entry)
        except OSError as err:  # e.g. a read-only file: the other entries are still removed
            failed.append(f"{entry.path}: {err}")
    headers = ["kind", "entry", "size", "last used"]
    if rows:
        print(markdown_table(headers, [[row[h] for h in headers] for row in rows]))
    freed = human_size(sum(e.size for e in removed))
    print(f"{'would remove' if dry_run else 'removed'} {len(removed)} entries, {freed}"
          + (" (dry run: nothing removed)" if dry_run else ""))
    if failed:
        raise EditingError(f"could not remove {len(failed)} cache entries (check their permissions; a part renamed "
                           f"to {REMOVING_PREFIX}* is finished by the next clear): " + "; ".join(failed))
    return rows

"""``editing data download``: fetch the task data from the paper's public repository into the cache folder.

The general sets R and G are the first 2000 and the remaining lines of the repository's ``val100-val.jsonl``,
exactly as in ``../shared/data`` (see its README).
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

from editing.core.errors import EditingError
from editing.core.files import write_bytes
from editing.core.paths import cache_dir
from editing.rules.tasks import BUILTIN_TASKS, ROLES, SPLITS

DEFAULT_BASE_URL = "https://raw.githubusercontent.com/john-hewitt/model-editing-canonical-examples/main/data"
GENERAL_SOURCE = "val100-val.jsonl"
REGULARIZATION_LINES = 2000


def task_files() -> list[str]:
    """Relative paths of every built-in task file (both splits)."""
    files = []
    for task in BUILTIN_TASKS.values():
        for role in ROLES:
            for split in SPLITS:
                files.append(str(task.file(role, split, Path(".")).as_posix()))
    return sorted(set(files))


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as err:
        raise EditingError(f"could not download {url}: {err}. Without network, copy the data folder by hand and "
                           "set data_root (or $EDITING_DATA_ROOT)") from err


def download(root: str | Path | None = None, base_url: str = DEFAULT_BASE_URL, overwrite: bool = False) -> Path:
    """Download every task file and build the general sets.

    Args:
        root: destination folder (default: ``<cache>/data``).
        base_url: URL of the repository's ``data`` folder.
        overwrite: fetch files that are already present.

    Returns:
        The data root.
    """
    root = Path(root) if root else cache_dir() / "data"
    base_url = base_url.rstrip("/")
    files = task_files()
    for i, rel in enumerate(files, start=1):
        target = root / rel
        if target.exists() and not overwrite:
            continue
        print(f"[{i}/{len(files)}] {rel}", file=sys.stderr, flush=True)
        write_bytes(target, _fetch(f"{base_url}/{rel}"), overwrite=True)
    general = root / "general"
    if overwrite or not (general / "degradation.jsonl").exists():
        # split on "\n" only: str.splitlines would also break at U+2028 and friends inside JSON strings
        lines = _fetch(f"{base_url}/{GENERAL_SOURCE}").split(b"\n")
        lines = [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        write_bytes(general / "regularization.jsonl", b"".join(lines[:REGULARIZATION_LINES]), overwrite=True)
        write_bytes(general / "degradation.jsonl", b"".join(lines[REGULARIZATION_LINES:]), overwrite=True)
    print(f"data ready in {root}", file=sys.stderr)
    return root

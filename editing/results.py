"""Writing results files atomically, never overwriting a finished run silently."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from editing.errors import EditingError


class ResultsExistError(EditingError, FileExistsError):
    """A results file already exists and overwriting was not asked for."""


def ensure_writable(path: str | Path, overwrite: bool, flag: str = "--overwrite true") -> None:
    """Raise ``ResultsExistError`` when ``path`` exists and overwriting was not asked for (check before the work).

    ``flag`` names the setting that allows overwriting, for the message.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ResultsExistError(
            f"{path} already exists: a finished run is never overwritten silently. Choose another output folder "
            f"or pass {flag}"
        )


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any, overwrite: bool = False) -> Path:
    """Write ``obj`` as indented JSON through a temporary file and a rename.

    Args:
        path: destination.
        obj: JSON-serialisable data (non-finite floats are written as strings).
        overwrite: replace an existing file.

    Returns:
        The path written.
    """
    path = Path(path)
    ensure_writable(path, overwrite)
    _atomic_write(path, json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    return path


def write_jsonl(path: str | Path, rows: Iterable[dict], overwrite: bool = False) -> Path:
    """Write one JSON object per line, atomically (see ``write_json``)."""
    path = Path(path)
    ensure_writable(path, overwrite)
    _atomic_write(path, "".join(json.dumps(_clean(r)) + "\n" for r in rows))
    return path

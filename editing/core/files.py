"""Writing files atomically: the one implementation every writer of the package uses.

A file is written into a temporary sibling (same folder, so the final rename stays on one filesystem), flushed to
disk, then renamed over its destination with ``os.replace``: a reader sees the old content or the new, never half a
file, and a writer that fails midway (an exception, a full disk, Ctrl-C) leaves nothing at the destination and no
temporary file behind. Writers that need a path to save into (``safetensors``, ``torch.save``, ``save_pretrained``
folders) get the temporary sibling's path through ``save_atomically``.

Results are never overwritten silently: every writer takes ``overwrite`` (default false) and refuses an existing
destination with ``ResultsExistError`` (``ensure_writable``); caches and files a command rewrites on purpose pass
``overwrite=True``. A leaf module (it imports only ``editing.core.errors``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from editing.core.errors import EditingError


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


def jsonable(obj: Any) -> Any:
    """``obj`` with what JSON cannot hold made plain: non-finite floats as strings (``"nan"``, ``"inf"``), paths as
    strings, tuples as lists, keys as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_mode(path: str | Path, folder: bool = False) -> None:
    # mkstemp/mkdtemp make 0600/0700 entries; what we write are ordinary files, readable as the umask allows
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _fsync(path: str | Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove(path: str | Path) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def _staging_file(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, overwrite: bool = False, flag: str = "--overwrite true",
                encoding: str | None = "utf-8", newline: str | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on leaving the block it replaces ``path``.

    If the block raises, the destination is left as it was and the temporary file is removed.

    Args:
        path: destination file.
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        overwrite: replace an existing destination (otherwise ``ResultsExistError``, raised before anything is
            written).
        flag: the setting that allows overwriting, for the message.
        encoding: text encoding (ignored for bytes).
        newline: as for ``open`` (``""`` for ``csv`` writers).

    Yields:
        The open file.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    ensure_writable(path, overwrite, flag)
    tmp = _staging_file(path)
    try:
        text = {"encoding": encoding, "newline": newline} if mode == "w" else {}
        with open(tmp, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        _ordinary_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str, *, overwrite: bool = False, flag: str = "--overwrite true",
               newline: str | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_open``). Returns the path."""
    with atomic_open(path, "w", overwrite=overwrite, flag=flag, newline=newline) as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False, flag: str = "--overwrite true") -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_open``). Returns the path."""
    with atomic_open(path, "wb", overwrite=overwrite, flag=flag) as handle:
        handle.write(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, overwrite: bool = False, flag: str = "--overwrite true") -> Path:
    """Write ``obj`` as indented JSON, atomically.

    Args:
        path: destination.
        obj: JSON-serialisable data (non-finite floats are written as strings, see ``jsonable``).
        overwrite: replace an existing file.
        flag: the setting that allows overwriting, for the message.

    Returns:
        The path written.
    """
    return write_text(path, json.dumps(jsonable(obj), indent=2, sort_keys=False) + "\n", overwrite=overwrite,
                      flag=flag)


def write_jsonl(path: str | Path, rows: Iterable[dict], overwrite: bool = False,
                flag: str = "--overwrite true") -> Path:
    """Write one JSON object per line, atomically (see ``write_json``)."""
    return write_text(path, "".join(json.dumps(jsonable(r)) + "\n" for r in rows), overwrite=overwrite, flag=flag)


def save_atomically(path: str | Path, save: Callable[[Path], object], *, folder: bool = False,
                    overwrite: bool = False, flag: str = "--overwrite true", keep_existing: bool = False) -> Path:
    """Let ``save`` write into a temporary sibling of ``path`` (a file, or a folder with ``folder``), then move the
    result into place: for writers that need a path (``safetensors.torch.save_file``, ``torch.save``,
    ``save_pretrained``).

    If ``save`` raises, nothing appears at ``path`` and the temporary file or folder is removed.

    Args:
        path: destination file or folder.
        save: called with the temporary path; writes the file there (or fills the folder, which exists already).
        folder: the destination is a folder.
        overwrite: replace an existing destination (otherwise ``ResultsExistError``, raised before ``save`` runs).
            A folder is replaced whole: the old one is moved aside, the new one renamed in, the old one removed.
        flag: the setting that allows overwriting, for the message.
        keep_existing: for caches any process may fill: when the destination exists by the time ``save`` is done
            (another process wrote it meanwhile), keep that copy and discard this one.

    Returns:
        The destination path.
    """
    path = Path(path)
    ensure_writable(path, overwrite or keep_existing, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.") if folder else _staging_file(path)
    try:
        save(Path(tmp))
        for written in (Path(tmp).rglob("*") if folder else [Path(tmp)]):
            if written.is_file() and not written.is_symlink():
                _ordinary_mode(written)
                _fsync(written)
        _ordinary_mode(tmp, folder)
        if keep_existing and path.exists():
            _remove(tmp)
        elif folder and path.exists():
            _replace_folder(Path(tmp), path)
        else:
            try:
                os.replace(tmp, path)
            except OSError:
                if not (keep_existing and path.exists()):
                    raise
                _remove(tmp)  # another process put its copy there first: keep it
    except BaseException:
        _remove(tmp)
        raise
    return path


def _replace_folder(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``, where a folder exists: ``os.replace`` cannot rename over a non-empty one."""
    aside = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
    try:
        with contextlib.suppress(FileNotFoundError):  # gone meanwhile: nothing to move aside
            os.replace(path, aside / path.name)
        try:
            os.replace(new, path)
        except OSError:
            if not path.exists():  # put the old folder back rather than lose both
                with contextlib.suppress(OSError):
                    os.replace(aside / path.name, path)
            raise
    finally:
        _remove(aside)


def create_exclusive(path: str | Path, text: str, before: Callable[[], object] | None = None) -> Path:
    """Create ``path`` holding ``text``, failing with ``FileExistsError`` if it exists; the file appears with its
    content complete (written to a temporary sibling, then hard-linked into place, which never replaces a file).

    Of several processes creating the same path at once, exactly one succeeds: the run-folder claims rely on it.

    Args:
        path: the file to create.
        text: its content.
        before: called once the content is safely written and before the link (e.g. to move a stale file aside).

    Returns:
        The path.
    """
    path = Path(path)
    tmp = _staging_file(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        _ordinary_mode(tmp)
        if before is not None:
            before()
        os.link(tmp, path)
    finally:
        _remove(tmp)
    return path


__all__ = ["ResultsExistError", "atomic_open", "create_exclusive", "ensure_writable", "jsonable", "save_atomically",
           "write_bytes", "write_json", "write_jsonl", "write_text"]

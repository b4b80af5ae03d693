"""Cache entries that are checked when read: the one reader and writer of every tensor cache of the package.

A cache may only ever return what a fresh computation would, or miss. Two things make that hold for what is on
disk, whatever happened to the file after it was written:

- Each entry is one ``.safetensors`` file whose metadata holds the entry's *material* (the JSON description of
  everything the tensors depend on, from which the key in its file name was hashed) and the *content hash* of the
  tensors (``editing.core.digests.tensor_sha256``: names, dtypes, shapes, bytes). ``read_entry`` recomputes the hash and
  compares both; an entry that is unreadable, truncated, of other material, changed since it was written, of an
  unexpected shape, or (where asked) holding NaN/Inf values is a *miss*: the caller computes the value again and a
  warning names the file and the reason.
- ``write_entry`` writes atomically (``editing.core.files``) and never fails a run: a full disk or a read-only cache
  folder costs the cache, with a warning, not the computation that was going to be stored.

A leaf module (the standard library, torch, safetensors and the package's leaves).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from editing.core.digests import tensor_sha256
from editing.core.files import save_atomically

log = logging.getLogger(__name__)

ENTRY_FORMAT = "canonical-editing cache entry 2"
"""The layout of an entry's metadata (what a reader looks for), not a version of what it holds: the code that
computes an entry is in its material (``editing.core.digests.code_digest``)."""


def canonical_json(material) -> str:
    """The material as the stable JSON string stored in an entry (sorted keys; paths and other objects as str)."""
    return json.dumps(material, sort_keys=True, default=str)


def _warn(what: str, path: Path, reason: str) -> None:
    log.warning("%s %s %s; computing it again", what, path, reason)


def write_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failed cache write raises (a full disk, a read-only folder): they cost the cache only."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(errors)


def write_entry(path: str | Path, tensors: dict[str, torch.Tensor], material=None, *,
                what: str = "cache entry") -> bool:
    """Write a cache entry atomically, with its material and content hash; never raises for a full or read-only
    cache folder (a warning says the entry was not kept).

    Args:
        path: the entry's file (``.safetensors``).
        tensors: what to store (moved to the CPU, made contiguous).
        material: JSON-able description of everything the tensors depend on (checked on reading).
        what: the entry's kind, for messages (``"p0 cache entry"``).

    Returns:
        True when the entry is on disk.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"format": ENTRY_FORMAT, "material": canonical_json(material), "content": tensor_sha256(tensors)}
    try:
        # replaces what is there: an entry another process wrote meanwhile is the same computation, and one that
        # was found damaged must not survive its recomputation
        save_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), overwrite=True)
    except write_errors() as err:
        log.warning("could not write the %s %s (%s); the run goes on without it", what, path, err)
        return False
    return True


def read_entry(path: str | Path, material=None, *, what: str = "cache entry", finite: bool = False,
               check: Callable[[dict[str, torch.Tensor]], str | None] | None = None) -> dict[str, torch.Tensor] | None:
    """Read a cache entry written by ``write_entry``, or None (a miss) when it is absent or cannot be trusted.

    Args:
        path: the entry's file.
        material: the material the caller needs (None: not compared); an entry of other material is a miss.
        what: the entry's kind, for messages.
        finite: an entry holding NaN or infinite floating values is a miss (statistics, backgrounds).
        check: further validation of the tensors (names, shapes); returns the reason they are wrong, or None.

    Returns:
        The tensors on the CPU, or None.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as err:  # noqa: BLE001 - any unreadable entry (safetensors raises its own error types)
        _warn(what, path, f"is unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})")
        return None
    if meta.get("format") != ENTRY_FORMAT or "content" not in meta:
        _warn(what, path, "was written by an older version (no content hash)")
        return None
    if material is not None and meta.get("material") != canonical_json(material):
        _warn(what, path, "was made for other settings than its name says")
        return None
    if tensor_sha256(tensors) != meta["content"]:
        _warn(what, path, "does not match its content hash (damaged or changed since it was written)")
        return None
    if finite:
        bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not _all_finite(t))
        if bad:
            _warn(what, path, f"holds NaN or infinite values ({', '.join(bad[:3])})")
            return None
    reason = check(tensors) if check is not None else None
    if reason:
        _warn(what, path, reason)
        return None
    return tensors


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether a CPU tensor read from a file holds only finite values, checked in numpy: no torch operation runs on
    the CPU beside a model on another device (``tests/fake_device.py`` counts those)."""
    import numpy as np

    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: an exponent of all ones is Inf or NaN
        bits = tensor.contiguous().view(torch.int16).numpy()
        return bool(((bits & 0x7F80) != 0x7F80).all())
    return bool(np.isfinite(tensor.contiguous().numpy()).all())


def expect_shapes(shapes: dict[str, tuple[int, ...]]) -> Callable[[dict[str, torch.Tensor]], str | None]:
    """A ``check`` for ``read_entry``: exactly these tensor names, of these shapes."""

    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        if set(tensors) != set(shapes):
            return f"holds tensors {sorted(tensors)}, expected {sorted(shapes)}"
        wrong = [k for k, s in shapes.items() if tuple(tensors[k].shape) != tuple(s)]
        if wrong:
            return f"has the wrong shape for {wrong[0]} ({tuple(tensors[wrong[0]].shape)}, expected {shapes[wrong[0]]})"
        return None

    return check


__all__ = ["ENTRY_FORMAT", "canonical_json", "expect_shapes", "read_entry", "write_entry", "write_errors"]

"""Integrity of saved edits: a manifest of content hashes written beside an edit's tensors, checked when it is loaded.

Every method's export ends in ``EditingModule.write_base_identity``, which writes ``edit_manifest.json``: the edit's
``kind`` (which registered loader applies it, see ``editing.methods.registry``) and ``method``; for each
``*.safetensors`` file of the folder a SHA-256 of its tensors (names, dtypes, shapes and bytes, in name order), and
for the adapter's ``adapter_config.json`` (its rank and alpha scale the update) a SHA-256 of the file. Loading an
edit (``editing.edits.load.load_edited``) recomputes them and refuses an edit whose numbers changed after it was
saved, and any tensor holding NaN or infinite values: a number reported from such an edit could not be trusted.

Edits saved before manifests existed are refused too, unless the user says they trust them
(``allow_unverified=True``, ``--allow_unverified true`` on the command line); their NaN/Inf check still runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from editing.core.errors import ConfigError
from editing.core.files import write_text

log = logging.getLogger(__name__)

MANIFEST = "edit_manifest.json"
MANIFEST_FORMAT = "canonical-editing edit manifest 1"
CONFIG_FILES = ("adapter_config.json",)
REEXPORT = ("re-export the edit from its fit run (rerun the fit, or resume it from its checkpoint) rather than "
            "changing edit files by hand")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of tensors: each name, dtype, shape and raw bytes, in name order (independent of file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file; a truncated or corrupt file is a ``ConfigError`` naming it.

    Args:
        path: the file.

    Returns:
        Its tensors on the CPU.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError alike mean a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable .safetensors file ({first}): it is truncated or corrupted; "
                          f"{REEXPORT}") from None


def check_finite(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors holding NaN or infinite values, naming the file and the tensor."""
    bad = [name for name, t in sorted(tensors.items()) if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ConfigError(f"{path}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} holds NaN "
                          "or infinite values, so every number computed with this edit would be meaningless; use the "
                          "edit of another ball or epoch, or rerun the fit (e.g. with a lower learning rate)")


def write_edit_manifest(folder: str | Path, kind: str | None = None, method: str | None = None,
                        sequence: list[dict] | None = None) -> Path:
    """Write ``edit_manifest.json`` for the tensor files (and adapter config) in ``folder``, atomically.

    Args:
        folder: an edit folder whose files are complete.
        kind: the edit's kind, which says how it is loaded (``editing.methods.registry``); None keeps the kind of
            the folder's present manifest (rewriting the hashes of an edit does not change what it is).
        method: the method that made it (kept from the present manifest likewise).
        sequence: the edits it was fitted on top of, oldest first (``editing fit --base_edit``): each one's folder,
            manifest SHA-256 and method; None keeps the present manifest's (none for a fit on the base model).

    Returns:
        The manifest's path.
    """
    folder = Path(folder)
    if kind is None and (folder / MANIFEST).is_file():
        kind, method = recorded_kind(folder)
    if sequence is None and (folder / MANIFEST).is_file():
        sequence = recorded_sequence(folder) or None
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors = read_safetensors(path)
        files[path.name] = {"sha256": tensor_digest(tensors), "tensors": len(tensors)}
    configs = {name: _file_sha256(folder / name) for name in CONFIG_FILES if (folder / name).is_file()}
    manifest = {"format": MANIFEST_FORMAT, "files": files, "config_files": configs}
    if kind is not None:
        manifest = {"format": MANIFEST_FORMAT, "kind": kind, "method": method, **manifest}
    if sequence:
        manifest["sequence"] = list(sequence)
    return write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n", overwrite=True)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a valid edit manifest ({err}); {REEXPORT}") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("config_files", {}), dict)):
        raise ConfigError(f"{path}: not an edit manifest written by canonical-editing; {REEXPORT}")
    return manifest


def recorded_kind(folder: str | Path) -> tuple[str | None, str | None]:
    """The edit kind and method recorded in ``folder``'s manifest: ``(None, None)`` without a manifest, and a None
    kind for a manifest written before kinds were recorded.

    Raises:
        ConfigError: the manifest is unreadable, or its kind is not a name.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None, None
    manifest = _read_manifest(path)
    kind, method = manifest.get("kind"), manifest.get("method")
    if kind is not None and (not isinstance(kind, str) or not kind):
        raise ConfigError(f"{path}: 'kind' must name the edit's kind (e.g. \"lora\"), not {kind!r}; {REEXPORT}")
    return kind, method if isinstance(method, str) else None


def recorded_sequence(folder: str | Path) -> list[dict]:
    """The edits an edit was fitted on top of, as its manifest records them (oldest first; empty for a fit on the
    base model or an edit without a manifest).

    Raises:
        ConfigError: the manifest is unreadable, or its ``sequence`` is not a list of objects.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return []
    sequence = _read_manifest(path).get("sequence", [])
    if not isinstance(sequence, list) or not all(isinstance(s, dict) for s in sequence):
        raise ConfigError(f"{path}: 'sequence' must be a list of the earlier edits (objects); {REEXPORT}")
    return sequence


def verify_edit(folder: str | Path, allow_unverified: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Check an edit folder's tensors against its manifest and for NaN/Inf, and return them.

    Args:
        folder: the edit folder.
        allow_unverified: accept a folder without a manifest (an edit saved by an older version), with a warning.

    Returns:
        File name -> its tensors, for every ``*.safetensors`` file of the folder.

    Raises:
        ConfigError: a file is unreadable, listed but missing, not listed, changed since it was saved (hash
            mismatch), or holds NaN/Inf; or there is no manifest and ``allow_unverified`` is false.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    present = {p.name: p for p in sorted(folder.glob("*.safetensors"))}
    if not manifest_path.is_file():
        if not allow_unverified:
            raise ConfigError(
                f"{folder} has no {MANIFEST}, so its tensors cannot be checked against the hashes recorded when it was "
                "saved (it was saved by an older canonical-editing, or the file was removed). Re-export it, or, if "
                "you trust it, pass --allow_unverified true (load_edited(..., allow_unverified=True))")
        log.warning("edit %s has no %s: its tensors are NOT verified (loaded because allow_unverified is set)",
                    folder, MANIFEST)
        loaded = {name: read_safetensors(path) for name, path in present.items()}
        for name, tensors in loaded.items():
            check_finite(folder / name, tensors)
        return loaded
    manifest = _read_manifest(manifest_path)
    listed = manifest["files"]
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise ConfigError(f"{folder / unlisted[0]} is not listed in {manifest_path}: the folder was changed after the "
                          f"edit was saved; remove the file or {REEXPORT}")
    loaded = {}
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            raise ConfigError(f"{path} is missing (listed in {manifest_path}); {REEXPORT}")
        tensors = read_safetensors(path)
        check_finite(path, tensors)
        if not isinstance(entry, dict) or tensor_digest(tensors) != entry.get("sha256"):
            raise ConfigError(f"{path}: its tensors do not match the hash recorded in {manifest_path} when the edit "
                              f"was saved (the file was changed or damaged since); {REEXPORT}")
        loaded[name] = tensors
    configs = manifest.get("config_files", {})
    for name in CONFIG_FILES:
        if (folder / name).is_file() and name not in configs:
            raise ConfigError(f"{folder / name} is not listed in {manifest_path}: the folder was changed after the "
                              f"edit was saved; {REEXPORT}")
    for name, expected in sorted(configs.items()):
        path = folder / name
        if not path.is_file() or _file_sha256(path) != expected:
            raise ConfigError(f"{path} is missing or was changed since the edit was saved (its hash differs from "
                              f"{manifest_path}); {REEXPORT}")
    return loaded


def edit_digest(loaded: dict[str, dict[str, torch.Tensor]]) -> str:
    """One SHA-256 over all the tensor files of an edit (what ``verify_edit`` returned)."""
    digest = hashlib.sha256()
    for name in sorted(loaded):
        digest.update(f"{name}:{tensor_digest(loaded[name])};".encode())
    return digest.hexdigest()


def content_digest(folder: str | Path, loaded: dict[str, dict[str, torch.Tensor]]) -> str:
    """One SHA-256 over what an edit does: its tensor files (``edit_digest``) and its config files (a LoRA adapter's
    rank and alpha scale its update), independent of the folder's path, so a copied folder has the same digest.

    Args:
        folder: the edit folder (its config files are read from there).
        loaded: its tensor files, as ``verify_edit`` returned them.
    """
    folder = Path(folder)
    digest = hashlib.sha256(edit_digest(loaded).encode())
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            digest.update(f"{name}:{_file_sha256(folder / name)};".encode())
    return digest.hexdigest()

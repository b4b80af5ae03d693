"""Apply a saved edit to its base model: the loader registered for the edit's kind (a LoRA adapter folder, changed
tensors, sense deltas, or a method of one's own) applies it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from editing.core.errors import ConfigError
from editing.methods.base import EditingModule
from editing.methods.registry import AppliedEdit, edit_loader
from editing.models.loading import ModelConfig, fingerprint_matches

log = logging.getLogger(__name__)


def read_edit_identity(folder: str | Path) -> dict:
    """The base model identity stored beside an edit (``base_model.json``)."""
    path = Path(folder) / "base_model.json"
    if not Path(folder).is_dir():
        raise ConfigError(f"edit folder {folder} does not exist; pass an edit folder (<run>/edits/ball_<eps>)")
    if not path.is_file():
        raise ConfigError(f"{folder} is not an edit folder: it has no base_model.json")
    fix = "it is written with the edit by the fit; restore it from the run folder or re-export the edit"
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); {fix}") from None
    if not isinstance(identity, dict) or not isinstance(identity.get("name"), str) or "fingerprint" not in identity:
        raise ConfigError(f"{path}: expected an object with the base model's 'name' and 'fingerprint'; {fix}")
    return identity


# Edits saved before manifests recorded their kind: the file that marked each kind, in the order they were looked for.
# Used only for such edits under allow_unverified; a method added later never needs an entry.
LEGACY_KIND_FILES: tuple[tuple[str, str], ...] = (("adapter_config.json", "lora"), ("edit.safetensors", "tensors"),
                                                  ("senses.safetensors", "senses"))


class EditedModule(EditingModule):
    """An ``EditingModule`` carrying a saved edit whose ``reference()`` takes the edit off again, so that p0 is the
    base model (the ensemble's "base Backpack" and the degradation reference need it); how depends on the edit's kind
    and is its loader's (``editing.methods.registry.AppliedEdit``)."""

    edit_kind: str = "none"
    applied: AppliedEdit | None = None

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        if self.applied is None:
            yield self.model
            return
        with self.applied.reference() as model:
            yield model


def _legacy_kind(folder: Path) -> str | None:
    """The kind an edit's file names suggest (what loading did before manifests recorded kinds), or None."""
    for name, kind in LEGACY_KIND_FILES:
        if (folder / name).is_file():
            return kind
    return None


def read_edit(folder: Path, allow_unverified: bool = False) -> tuple[dict, str, str | None, dict]:
    """An edit folder's base identity, kind, method and verified tensor files (file name -> tensors).

    Raises:
        ConfigError: no edit in the folder, tensors that fail verification, or no recorded kind (unless
            ``allow_unverified``, which guesses it from the file names).
    """
    from editing.runs.manifest import MANIFEST, recorded_kind, verify_edit

    identity = read_edit_identity(folder)
    kind, method = recorded_kind(folder)
    guessed = _legacy_kind(folder) if kind is None else None
    if kind is None and guessed is None:
        raise ConfigError(f"{folder} holds no edit: neither a LoRA adapter (adapter_config.json), edit.safetensors "
                          "nor senses.safetensors; pass an edit folder of a fit run (<run>/edits/ball_<eps>)")
    files = verify_edit(folder, allow_unverified)
    if kind is None:
        if not allow_unverified:
            raise ConfigError(
                f"{folder / MANIFEST} does not record the edit's kind (it was saved by an older canonical-editing), so "
                "which method's loader applies it is not known. Re-export the edit, or, if you trust it, pass "
                "--allow_unverified true (load_edited(..., allow_unverified=True)) to guess it from the file names")
        log.warning("edit %s records no kind: loading it as %r, guessed from its file names (allow_unverified is set)",
                    folder, guessed)
        kind = guessed
    return identity, kind, method, files


def load_edited(edit: str | Path, base: ModelConfig | None = None, allow_unverified: bool = False) -> EditedModule:
    """Load the base model an edit was made on and apply the edit.

    The edit's tensors are checked first against the hashes recorded when it was saved, and for NaN/Inf
    (``editing.runs.manifest.verify_edit``); then the loader registered for the edit's kind (recorded in its manifest)
    applies it, whatever files the folder holds.

    Args:
        edit: an edit folder written by a fit run (``<run>/edits/ball_<eps>``).
        base: the base model settings (default: the name recorded in the edit, at fp32).
        allow_unverified: load an edit that has no manifest, or a manifest without the edit's kind (saved by an
            older version), with a warning; its kind is then guessed from its file names.

    Returns:
        An ``EditedModule`` whose model carries the edit, ready for ``editing.evaluation.evaluate``; its
        ``reference()`` computes the base model (for an edit of changed tensors, their base values are kept).
        ``identity["edit_sha256"]`` is a hash of the edit's tensors.
    """
    from editing.runs.manifest import edit_digest

    folder = Path(edit)
    identity, kind, method, files = read_edit(folder, allow_unverified)
    load = edit_loader(kind, method, str(folder))
    base = base or ModelConfig(name=identity["name"], precision="fp32")
    module = EditedModule(base)
    if not fingerprint_matches(identity.get("fingerprint"), module.identity, module.model):
        raise ConfigError(
            f"edit {folder} was made on {identity.get('name')!r} (fingerprint {identity.get('fingerprint')}), not on "
            f"{module.identity['name']!r} (fingerprint {module.identity['fingerprint']})"
        )
    applied = load(module.model, folder, files, module.identity["name"])
    module.model = applied.model
    module.applied = applied
    module.edit_kind = kind
    module.identity["edit"] = str(folder)
    module.identity["edit_sha256"] = edit_digest(files)
    return module

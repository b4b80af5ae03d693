"""A saved edit merged into its base model and written as a plain transformers folder (``editing export --merged``,
``EditResult.export``): safetensors weights, ``config.json``, the tokenizer and ``generation_config.json``, which
``AutoModelForCausalLM.from_pretrained`` loads without this package.

Which edits can be merged is the registry's word: a method whose edit is a weight change registers a ``merge_edit``
(``editing.methods.registry.MethodSpec``); an edit of any other method is refused with the reason. The weights are
written in fp32 whatever the base was read from (the embedded GGUF is dequantized on load), so the folder computes
what ``load_edited`` computes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.core.files import ensure_writable, save_atomically, write_json
from editing.core.types import MethodName
from editing.methods.registry import METHODS, EditMerger

log = logging.getLogger(__name__)

EXPORT_RECORD = "canonical_editing_export.json"
"""Written beside the weights: which edit of which base the folder holds (transformers ignores the file)."""


def edit_merger(kind: str, method: str | None, where: str) -> EditMerger:
    """The ``merge_edit`` of the method that made an edit (recorded in its manifest), else of a method of its kind.

    Raises:
        ConfigError: the edit is not a weight change (no method of its kind registers a merge), with the reason.
    """
    specs = [spec for spec in METHODS.values() if spec.edit_kind == kind]
    try:
        made_by = METHODS.get(MethodName(method)) if method else None
    except ConfigError:  # a method not registered in this process: its kind decides
        made_by = None
    if made_by is not None and made_by.edit_kind == kind:
        specs = [made_by]
    for spec in specs:
        if spec.merge_edit is not None:
            return spec.merge_edit
    by = f"method {method!r}" if method else f"kind {kind!r}"
    raise ConfigError(
        f"{where}: an edit of {by} (kind {kind!r}) is not a change of the base model's weights (it is applied at run "
        "time, e.g. sense vectors installed into a Backpack or a codebook consulted per input), so no plain "
        "transformers model can carry it; use it through canonical-editing (`editing apply --edit`, "
        "`load_edited`). Methods whose edit is a weight change (full, lora, memit, ...) can be exported")


def _plain_transformers(model: nn.Module, where: str) -> None:
    """Refuse an architecture this package defines (a Backpack): ``from_pretrained`` would need the package."""
    module = type(model).__module__
    if not module.startswith("transformers."):
        raise ConfigError(f"{where}: the base model's architecture ({type(model).__name__}, from {module}) is this "
                          "package's own, not a transformers one, so a plain transformers folder cannot load it; "
                          "keep the edit as it is and load it with canonical-editing (`load_edited`)")


def _refuse_run_folder(folder: Path) -> None:
    if not (folder / "base_model.json").is_file() and (folder / "edits").is_dir():
        balls = sorted(p.name for p in (folder / "edits").iterdir() if p.is_dir())
        raise ConfigError(f"--edit {folder} is a run folder, not an edit; pass one of its edits: "
                          + ", ".join(str(folder / "edits" / b) for b in balls or ["ball_<eps>"]))


def export_merged(edit: str | Path, out: str | Path, overwrite: bool = False,
                  allow_unverified: bool = False) -> Path:
    """Write the edit in ``edit`` merged into its base model as a transformers model folder ``out``.

    Args:
        edit: an edit folder (``<run>/edits/ball_<eps>``).
        out: the model folder to write (written whole, then moved into place).
        overwrite: replace an existing ``out`` (otherwise it is refused before any work).
        allow_unverified: as for ``load_edited`` (an edit saved without a manifest).

    Returns:
        The folder written.

    Raises:
        ConfigError: an edit that is not a weight change, or a base model of this package's own architecture.
        ResultsExistError: ``out`` exists and ``overwrite`` is not set.
    """
    from editing.edits.load import load_edited
    from editing.runs.manifest import recorded_kind

    folder, out = Path(edit), Path(out)
    _refuse_run_folder(folder)
    kind, method = recorded_kind(folder) if folder.is_dir() else (None, None)
    if kind is not None:
        edit_merger(kind, method, str(folder))  # refused before the model is loaded
    ensure_writable(out, overwrite)
    module = load_edited(folder, allow_unverified=allow_unverified)
    kind = module.edit_kind  # the same, or the one guessed for an old edit under allow_unverified
    merge = edit_merger(kind, method, str(folder))
    model = merge(module.applied)
    _plain_transformers(model, str(folder))
    model = model.to(torch.float32)
    model.config.dtype = torch.float32
    tokenizer = module.loaded.tokenizer
    record = {"edit": str(folder.resolve()), "kind": kind, "method": method, "base": module.identity["name"],
              "base_fingerprint": module.identity["fingerprint"], "edit_sha256": module.identity["edit_sha256"],
              "dtype": "float32"}

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "generation_config.json").is_file():
            model.generation_config.save_pretrained(str(tmp))
        write_json(tmp / EXPORT_RECORD, record)

    save_atomically(out, save, folder=True, overwrite=overwrite)
    log.info("exported %s merged into %s as %s", folder, module.identity["name"], out)
    return out

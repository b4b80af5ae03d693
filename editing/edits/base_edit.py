"""Read the edit a fit continues (``editing fit --base_edit DIR``) into a ``editing.methods.base_edit.BaseEdit``.

The edit is verified as ``load_edited`` verifies it (manifest hashes, NaN/Inf, its kind), checked to be an edit of
the fit's own base model, and turned into the weights it gives the base model: a changed-tensors edit (every step of
a sequence after the first) holds them already; a LoRA adapter (a sequence's first step) is merged into the weights
it adapts; an edit of another form (a GRACE codebook) is passed on as it is, for a fit of its own method. Every
refusal names ``--base_edit`` and the fix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing.core.errors import ConfigError
from editing.edits.load import load_edited, read_edit
from editing.methods.base import EditingModule
from editing.methods.base_edit import BaseEdit, file_sha256
from editing.methods.registry import METHODS
from editing.methods.tensor_edit import TENSOR_EDIT_FILE, TENSORS_KIND
from editing.models.loading import ModelConfig
from editing.runs.manifest import MANIFEST, recorded_sequence

FIX = "give the edit folder of the step before (<run>/edits/ball_<eps>, as its fit wrote it)"


def read_base_edit(folder: str | Path, module: EditingModule) -> BaseEdit:
    """The edit in ``folder``, to continue with ``module`` (not changed here; see ``EditingModule.set_base_edit``).

    Raises:
        ConfigError: no such folder, not a verified edit, an edit of another base model, or an edit that is no
            weight change (naming ``--base_edit`` and the fix).
    """
    path = Path(folder)
    where = f"--base_edit {folder}"
    if not path.is_dir():
        raise ConfigError(f"{where}: no such folder; {FIX}")
    try:
        identity, kind, method, files = read_edit(path)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    ours = module.identity
    if identity.get("fingerprint") != ours.get("fingerprint"):
        raise ConfigError(f"{where} was made on base model {identity.get('name')!r} (fingerprint "
                          f"{identity.get('fingerprint')}), but this fit edits {ours.get('name')!r} (fingerprint "
                          f"{ours.get('fingerprint')}); continue a sequence on the model it started from "
                          f"(--model.init_args.base.name {identity.get('name')}), or {FIX}")
    method = method or kind
    weights = True
    if kind == TENSORS_KIND:
        tensors = dict(files[TENSOR_EDIT_FILE])
    elif _merger(kind) is not None:
        tensors = _merged_weights(path, kind, identity)
    else:  # e.g. a GRACE codebook: only a fit of its own method can continue it (set_base_edit says so otherwise)
        tensors, weights = {}, False
    return BaseEdit(str(folder), file_sha256(path / MANIFEST), method, tensors, files, recorded_sequence(path), kind,
                    weights)


def _merger(kind: str):
    """The registered method that merges edits of ``kind`` into weights, or None."""
    return next((s for s in METHODS.values() if s.edit_kind == kind and s.merge_edit is not None), None)


def _merged_weights(folder: Path, kind: str, identity: dict) -> dict[str, torch.Tensor]:
    """The weights an edit of another kind gives the base model (its registered ``merge_edit``), those it changes."""
    spec = _merger(kind)
    edited = load_edited(folder, ModelConfig(name=identity["name"], precision="fp32"))
    original = {}
    with edited.reference() as model:
        for name, param in model.named_parameters():
            if "lora_" not in name:  # peft's names: base_model.model.<module>.base_layer.weight
                original[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = param.detach().clone()
    merged = spec.merge_edit(edited.applied)
    return {name: param.detach().cpu().contiguous() for name, param in merged.named_parameters()
            if name in original and not torch.equal(param.detach(), original[name])}

"""Sense finetuning's edit: the selected (word, sense) pairs and their delta vectors alone, in
``senses.safetensors`` (edit kind ``senses``), applied by installing them into a Backpack."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.core.files import write_text
from editing.methods.registry import AppliedEdit, edit_file
from editing.methods.senses.deltas import SenseDeltas, install_sense_deltas
from editing.methods.senses.module import SensesEditor
from editing.models.architecture import backpack_of

SENSES_KIND = "senses"
SENSE_EDIT_FILE = "senses.safetensors"


def save_sense_edit(folder: str | Path, deltas: SenseDeltas, importance: torch.Tensor | None = None) -> Path:
    """Write the deltas alone: vocab ids, sense indices, vectors (and the selection importance)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"vocab_ids": deltas.vocab_ids.cpu(), "sense_ids": deltas.sense_ids.cpu(),
               "vectors": deltas.vectors.detach().float().cpu().contiguous()}
    if importance is not None:
        tensors["importance"] = importance.float().cpu()
    save_file(tensors, str(folder / SENSE_EDIT_FILE))
    return folder / SENSE_EDIT_FILE


def load_sense_edit(path: str | Path, model, tensors: dict[str, torch.Tensor] | None = None) -> SenseDeltas:
    """Read a sense edit file and install it into ``model`` (a Backpack).

    Args:
        path: the ``senses.safetensors`` file.
        model: the Backpack.
        tensors: the file's tensors when already read (and verified, see ``editing.edits.load.load_edited``).
    """
    from editing.runs.manifest import read_safetensors

    tensors = read_safetensors(path) if tensors is None else tensors
    missing = {"vocab_ids", "sense_ids", "vectors"} - set(tensors)
    if missing:
        raise ConfigError(f"{path} is not a sense edit: it lacks {sorted(missing)}")
    backpack = backpack_of(model)
    if backpack is None:
        raise ConfigError(f"cannot apply sense edit {path}: the model is not a Backpack")
    config = backpack.config
    vectors, vocab_ids, sense_ids = tensors["vectors"], tensors["vocab_ids"], tensors["sense_ids"]
    if vectors.dim() != 2 or vectors.shape[-1] != config.n_embd:
        raise ConfigError(f"{path}: vectors have shape {tuple(vectors.shape)}, the model's senses need (pairs, "
                          f"{config.n_embd}); the edit was made for another Backpack")
    if vocab_ids.shape != (vectors.shape[0],) or sense_ids.shape != (vectors.shape[0],):
        raise ConfigError(f"{path}: vocab_ids {tuple(vocab_ids.shape)}, sense_ids {tuple(sense_ids.shape)} and "
                          f"vectors {tuple(vectors.shape)} disagree on the number of (word, sense) pairs; the file is "
                          "damaged, re-export the edit")
    if vocab_ids.numel() and (int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= config.vocab_size
                              or int(sense_ids.min()) < 0 or int(sense_ids.max()) >= config.num_senses):
        raise ConfigError(f"{path}: word or sense indices lie outside the model's {config.vocab_size} words x "
                          f"{config.num_senses} senses; the edit was made for another Backpack")
    deltas = SenseDeltas(tensors["vocab_ids"], tensors["sense_ids"], config.vocab_size, config.num_senses,
                         config.n_embd)
    with torch.no_grad():
        deltas.vectors.copy_(tensors["vectors"])
    deltas.requires_grad_(False)
    deltas.to(next(model.parameters()).device)
    install_sense_deltas(model, deltas)
    return deltas


def write_senses_edit(module: SensesEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save the selected deltas alone (``senses.safetensors``) and the selection's counts (``selection.json``): the
    ``write_edit`` of sense finetuning."""
    current = None
    if state is not None:
        current = module.delta_state()
        module.load_delta_state(state)
    try:
        importance = module.selection.importance if module.selection is not None else None
        save_sense_edit(folder, module.sense_deltas, importance)
    finally:
        if current is not None:
            module.load_delta_state(current)
    write_text(folder / "selection.json", json.dumps(module.hparams.get("selection", {}), indent=2) + "\n",
               overwrite=True)


class AppliedSenses(AppliedEdit):
    """Sense deltas installed into a Backpack; p0 is the Backpack with them uninstalled.

    Args:
        model: the Backpack carrying the deltas.
        tensors: the edit file's tensors (vocab ids, sense ids, vectors, importance).
    """

    def __init__(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(model)
        self.tensors = tensors

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        backpack = backpack_of(self.model)
        deltas = backpack.sense_edit
        object.__setattr__(backpack, "sense_edit", None)
        try:
            yield self.model
        finally:
            object.__setattr__(backpack, "sense_edit", deltas)


def apply_sense_edit(model: nn.Module, folder: Path, tensors: dict[str, dict[str, torch.Tensor]],
                     base_name: str) -> AppliedSenses:
    """Install the sense edit of ``folder`` into ``model`` (the ``load_edit`` of kind ``senses``)."""
    values = edit_file(folder, tensors, SENSE_EDIT_FILE)
    load_sense_edit(folder / SENSE_EDIT_FILE, model, tensors=values)
    return AppliedSenses(model, values)

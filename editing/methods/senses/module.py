"""Sense finetuning (SPEC section 8): only the selected sense vectors of a Backpack move; p0 is the deltas off."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from editing.errors import ConfigError
from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.senses.config import SensesConfig
from editing.methods.senses.deltas import SenseDeltas
from editing.methods.senses.selection import Selection, cached_background, example_importance, select_senses
from editing.models.architecture import backpack_of
from editing.models.loading import ModelConfig
from editing.types import MethodName

log = logging.getLogger(__name__)

SENSE_EDIT_FILE = "senses.safetensors"


def install_sense_deltas(model, deltas: SenseDeltas | None) -> None:
    """Make ``model``'s Backpack add ``deltas`` to its senses (None removes them)."""
    backpack = backpack_of(model)
    if backpack is None:
        raise ConfigError(f"{type(model).__name__} is not a Backpack: sense edits need a Backpack model "
                          "(model_type backpack-gpt2, e.g. stanfordnlp/backpack-gpt2 or tiny-backpack)")
    object.__setattr__(backpack, "sense_edit", deltas)


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
        tensors: the file's tensors when already read (and verified, see ``editing.edits.load_edited``).
    """
    from editing.integrity import read_safetensors

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


class SenseFinetune(EditingModule):
    """Finetune the sense vectors that alpha importance selects, on a Backpack language model.

    The selection needs the canonical examples and R, so it runs in ``setup`` (before checkpoints are restored and
    optimizers made); its background statistics are cached per (model, R).

    Args:
        base: the base model (a Backpack).
        senses: selection settings.
        optimizer: optimizer settings.
        regularization: regularization toward p0.
    """

    method = MethodName.SENSES

    def __init__(self, base: ModelConfig | None = None, senses: SensesConfig | None = None,
                 optimizer: OptimizerConfig | None = None, regularization: RegularizationConfig | None = None) -> None:
        self.senses_config = senses or SensesConfig()
        super().__init__(base=base or ModelConfig(name="tiny-backpack"), optimizer=optimizer,
                         regularization=regularization)
        self.hparams["senses"] = asdict(self.senses_config)
        self.sense_deltas: SenseDeltas | None = None
        self.selection: Selection | None = None

    def _prepare_deltas(self) -> None:
        if backpack_of(self.model) is None:
            raise ConfigError(
                f"sense finetuning needs a Backpack model, but model.base.name={self.base_config.name!r} is a "
                f"{type(self.model).__name__}; use a Backpack (stanfordnlp/backpack-gpt2, a distilled Backpack "
                "folder, or tiny-backpack)"
            )

    @property
    def backpack_config(self):
        """The Backpack's config."""
        return backpack_of(self.model).config

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.sense_deltas is None:
            self.select(self.trainer.datamodule)

    def select(self, datamodule) -> Selection:
        """Select the pairs from ``datamodule``'s canonical examples and R, and create their deltas."""
        if datamodule.tokenizer is None:
            datamodule.attach(self.tokenizer, self.max_length)
        cfg = self.senses_config
        config = self.backpack_config
        texts = datamodule.load("regularization").examples[: cfg.background_limit]
        background = cached_background(self.model, self.identity["fingerprint"], texts, config.vocab_size,
                                       config.num_senses, datamodule.pad_id, cfg.background_batch_texts)
        examples = datamodule.load("canonical").examples
        candidates = example_importance(self.model, examples, datamodule.task.loss, background,
                                        cfg.selection_lambda, datamodule.pad_id)
        selection = select_senses(candidates, config.num_senses, cfg.senses_per_example, cfg.selection,
                                  cfg.total_senses)
        if selection.capped_examples:
            log.warning("sense selection: %d example(s) had fewer than %d candidate senses; all of theirs were kept",
                        selection.capped_examples, selection.requested)
        self.selection = selection
        self.sense_deltas = SenseDeltas(selection.vocab_ids, selection.sense_ids, config.vocab_size,
                                        config.num_senses, config.n_embd).to(next(self.model.parameters()).device)
        install_sense_deltas(self.model, self.sense_deltas)
        self.hparams["selection"] = {"pairs": len(selection), "capped_examples": selection.capped_examples,
                                     "examples": len(examples), "background_texts": len(texts)}
        log.info("sense finetuning: %d (word, sense) pairs selected from %d examples", len(selection), len(examples))
        return selection

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        deltas = self.sense_deltas
        if deltas is None:
            yield self.model
            return
        deltas.enabled = False
        try:
            yield self.model
        finally:
            deltas.enabled = True

    def trainable_parameters(self) -> dict[str, torch.Tensor]:
        return {} if self.sense_deltas is None else {"sense_deltas.vectors": self.sense_deltas.vectors}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sense_selection"] = {"vocab_ids": self.sense_deltas.vocab_ids.cpu(),
                                         "sense_ids": self.sense_deltas.sense_ids.cpu()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("sense_selection")
        if saved is not None and self.sense_deltas is not None and not (
                torch.equal(saved["vocab_ids"], self.sense_deltas.vocab_ids.cpu())
                and torch.equal(saved["sense_ids"], self.sense_deltas.sense_ids.cpu())):
            raise ConfigError("the checkpoint's selected senses differ from this run's selection: resume with the "
                              "same data and senses settings")

    def export_edit(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Save the selected deltas alone (``senses.safetensors``) with the base model's identity."""
        folder = Path(folder)
        current = None
        if state is not None:
            current = self.delta_state()
            self.load_delta_state(state)
        try:
            importance = self.selection.importance if self.selection is not None else None
            save_sense_edit(folder, self.sense_deltas, importance)
        finally:
            if current is not None:
                self.load_delta_state(current)
        self.write_base_identity(folder)
        (folder / "selection.json").write_text(json.dumps(self.hparams.get("selection", {}), indent=2) + "\n")
        return folder

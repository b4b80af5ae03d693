"""Sense finetuning (SPEC section 8): only the selected sense vectors of a Backpack move; p0 is the deltas off."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.evaluation.incremental import SenseEdit
from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.senses.config import SensesConfig
from editing.methods.senses.deltas import SenseDeltas, install_sense_deltas
from editing.methods.senses.selection import Selection, cached_background, example_importance, select_senses
from editing.models.architecture import backpack_of
from editing.models.loading import ModelConfig

log = logging.getLogger(__name__)


class SensesEditor(EditingModule):
    """Finetune the sense vectors that alpha importance selects, on a Backpack language model.

    The selection needs the canonical examples and R, so it runs in ``setup`` (before checkpoints are restored and
    optimizers made), on the device the trainer's strategy will use; its background statistics are cached per
    (model, R).

    Args:
        base: the base model (a Backpack).
        senses: selection settings.
        optimizer: optimizer settings.
        regularization: regularization toward p0.
    """

    p0_is_base = True  # the sense deltas start at zero: the model before the first step is the base model
    cannot_continue = ("its edit is sense deltas added to a Backpack's senses, not a weight change; to use two sense "
                       "edits together, combine them: editing apply --edit A --edit B")

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
            # Lightning runs setup before its strategy moves the module to the device: select there, not on the CPU
            device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
            if device is not None:
                self.to(device)
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

    def evaluation_shortcut(self) -> SenseEdit | None:
        """Only the selected sense vectors move and alpha is frozen: each evaluation recomputes only the positions
        that attend to a selected word (``editing.evaluation.incremental``)."""
        deltas = self.sense_deltas
        if deltas is None:
            return None
        return SenseEdit(deltas.vocab_ids, deltas.sense_ids, deltas.vectors, self.reference)

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

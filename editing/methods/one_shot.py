"""The fit loop of methods that make their whole edit at once (MEMIT, ROME, AlphaEdit, GRACE): no optimizer and
no training batches; the edit is computed from all canonical examples at the start of the first epoch, the
DegradationBudget callback evaluates p0 before it and the edited model after it, and the run stops there."""

from __future__ import annotations

from typing import ClassVar

from editing.core.errors import ConfigError


class OneShotFit:
    """Mixin (before ``EditingModule`` in the bases) for a method whose ``compute_edit(datamodule)`` makes the whole
    edit and sets ``self.edited``; a resumed run whose checkpoint holds the edit does not compute it again."""

    label: ClassVar[str] = "this method"
    """The method's name in messages."""
    one_process_reason: ClassVar[str] = "it takes no gradient steps, so there is nothing for DDP to average"
    """Why the method runs in one process (the refusal of a multi-process fit says it)."""

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self._trainer is not None and getattr(self.trainer, "world_size", 1) > 1:
            raise ConfigError(f"{self.label} runs in one process (this fit has {self.trainer.world_size}): "
                              f"{self.one_process_reason}. Use --trainer.devices 1")

    def configure_optimizers(self):
        return None

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> int:
        return -1  # the edit was made at the start of the epoch; the canonical batches are not iterated

    def training_step(self, batch: dict, batch_idx: int) -> None:
        return None

    def on_train_epoch_start(self) -> None:
        if not self.edited:
            self.compute_edit(self.trainer.datamodule)
        self.trainer.should_stop = True  # one edit: the callback evaluates after this epoch, then the run ends

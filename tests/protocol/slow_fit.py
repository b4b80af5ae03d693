"""A callback that slows a fit's epochs (issue 36 item 7's tests of ``editing auto`` under a deadline): added to a
real tiny fit with ``--trainer.callbacks+=tests.protocol.slow_fit.SlowEpochs``, it sleeps at the start of every
epoch from ``from_epoch`` on (0-based, as Lightning counts), so that a deadline or a time share falls inside an
epoch while the epochs before it are evaluated and written."""

from __future__ import annotations

import time

import lightning as L


class SlowEpochs(L.Callback):
    """Sleep ``seconds`` at the start of each epoch ``>= from_epoch``.

    Args:
        seconds: how long each slowed epoch waits before training.
        from_epoch: the first (0-based) epoch slowed.
    """

    def __init__(self, seconds: float = 1.0, from_epoch: int = 0) -> None:
        self.seconds = seconds
        self.from_epoch = from_epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.current_epoch >= self.from_epoch:
            time.sleep(self.seconds)

"""Exact mid-epoch resume for training loaders: a loader that knows its place in the epoch, and the DataModule part
that carries that place in checkpoints.

A run resumed from a mid-epoch checkpoint (``every_n_train_steps``, a time limit, Ctrl-C, kill -9) must see exactly
the batches an uninterrupted run would; without this Lightning starts the epoch's data over while counting its
batches as done.
"""

from __future__ import annotations

from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A training DataLoader whose place is (epoch, batches yielded so far in it).

    ``resume_at`` makes the next iteration of that epoch skip the batches already trained on. The skipping is done by
    the sampler (which must have ``epoch`` and ``skip``): a batch sampler skips batches, an index sampler skips
    ``batch_size`` indices per batch. Lightning does not prefetch sized loaders, so the count is the number of
    batches the run has consumed.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = 0
        self._resume: dict[str, int] | None = None

    def _epoch_sampler(self) -> tuple[object, int]:
        """The sampler that carries the epoch and the skip, and how many of its items make one batch."""
        if hasattr(self.batch_sampler, "skip"):
            return self.batch_sampler, 1
        return self.sampler, int(self.batch_size)

    def __iter__(self):
        # a generator: its body runs at the first batch, after Lightning has called set_epoch for the epoch
        resume, self._resume = self._resume, None
        sampler, per_batch = self._epoch_sampler()
        skip = resume["batches"] if resume is not None and resume["epoch"] == sampler.epoch else 0
        sampler.skip = skip * per_batch
        self.batches_done = skip
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch

    def position(self) -> dict[str, int]:
        """Where the run is: the epoch and the batches of it consumed."""
        return {"epoch": int(self._epoch_sampler()[0].epoch), "batches": int(self.batches_done)}

    def resume_at(self, position: dict[str, int]) -> None:
        """Start the next iteration at ``position`` (if it is in that iteration's epoch)."""
        self._resume = {"epoch": int(position["epoch"]), "batches": int(position["batches"])}


class TrainPositionState:
    """For a LightningDataModule: keeps its training loader's place in checkpoints.

    The place travels through the DataModule, whose state Lightning restores before it builds any loader (a loader's
    own state is not restored when ``configure_optimizers`` asks for ``estimated_stepping_batches``, which builds the
    training loader early). Call ``track_train_loader`` on every training loader made.
    """

    _train_loader: ResumableLoader | None = None
    _resume: dict[str, int] | None = None

    def track_train_loader(self, loader: ResumableLoader) -> ResumableLoader:
        """Remember ``loader`` as the training loader, starting it at a restored place if there is one."""
        if self._resume is not None:
            loader.resume_at(self._resume)
            self._resume = None
        self._train_loader = loader
        return loader

    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.position()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        position = state.get("train_position")
        if position is None:
            return
        if self._train_loader is not None:
            self._train_loader.resume_at(position)
        else:
            self._resume = position

"""Additive deltas for selected (vocab id, sense index) pairs, installed into a Backpack's sense computation."""

from __future__ import annotations

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.models.architecture import backpack_of


class SenseDeltas(nn.Module):
    """C'(x)_l = C(x)_l + delta_(x, l) for the selected pairs; other senses pass through unchanged.

    Args:
        vocab_ids: (n,) vocab id of each selected pair.
        sense_ids: (n,) sense index of each selected pair.
        vocab_size: the model's vocabulary size.
        num_senses: senses per word.
        dim: sense vector width.
    """

    def __init__(self, vocab_ids: torch.Tensor, sense_ids: torch.Tensor, vocab_size: int, num_senses: int,
                 dim: int) -> None:
        super().__init__()
        if vocab_ids.shape != sense_ids.shape:
            raise ValueError("vocab_ids and sense_ids must have the same shape")
        if vocab_ids.numel() and (int(vocab_ids.max()) >= vocab_size or int(vocab_ids.min()) < 0):
            raise ValueError(f"a selected vocab id is outside 0..{vocab_size - 1}")
        if sense_ids.numel() and (int(sense_ids.max()) >= num_senses or int(sense_ids.min()) < 0):
            raise ValueError(f"a selected sense index is outside 0..{num_senses - 1}")
        self.register_buffer("vocab_ids", vocab_ids.long().clone())
        self.register_buffer("sense_ids", sense_ids.long().clone())
        # slot[w, l] = row of `vectors` for a selected pair, else -1: one gather per forward pass
        slot = torch.full((vocab_size, num_senses), -1, dtype=torch.long)
        slot[self.vocab_ids, self.sense_ids] = torch.arange(vocab_ids.numel())
        self.register_buffer("slot", slot, persistent=False)
        # zero at the start, so the edited model begins exactly at p0
        self.vectors = nn.Parameter(torch.zeros(vocab_ids.numel(), dim))
        self.enabled = True

    def forward(self, input_ids: torch.Tensor, senses: torch.Tensor) -> torch.Tensor:
        """Add the deltas to ``senses`` (b, k, s, d) of ``input_ids`` (b, s)."""
        if not self.enabled or self.vectors.numel() == 0:
            return senses
        slots = self.slot[input_ids].transpose(1, 2)  # (b, k, s)
        hit = slots >= 0
        delta = self.vectors[slots.clamp(min=0)] * hit[..., None].to(self.vectors.dtype)
        return senses + delta.to(senses.dtype)


def install_sense_deltas(model, deltas: SenseDeltas | None) -> None:
    """Make ``model``'s Backpack add ``deltas`` to its senses (None removes them)."""
    backpack = backpack_of(model)
    if backpack is None:
        raise ConfigError(f"{type(model).__name__} is not a Backpack: sense edits need a Backpack model "
                          "(model_type backpack-gpt2, e.g. stanfordnlp/backpack-gpt2 or tiny-backpack)")
    object.__setattr__(backpack, "sense_edit", deltas)

"""Padding collation and token-budget batching (DDP-aware, no duplicated examples)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from editing.data.tokenize import TokenizedExample

IGNORE = -100


def collate(examples: list[TokenizedExample], role: str = "", pad_id: int = 0) -> dict:
    """Pad a list of examples into one batch of sequences (right padding).

    Returns:
        A dict with ``input_ids``, ``attention_mask`` and ``labels`` (the token each position predicts, or -100
        where the position is not scored), each (sequences, length); ``seq_example`` (which example of the batch
        each sequence belongs to), ``seq_slot`` (which suffix), ``example_index`` (examples' file indices),
        ``n_slots`` (sequences per example), ``truncated`` (prefix tokens cut) and ``role``.
    """
    seqs = [(i, slot, s) for i, ex in enumerate(examples) for slot, s in enumerate(ex.sequences)]
    length = max((len(s.ids) for _, _, s in seqs), default=1)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE, dtype=torch.long)
    for row, (_, _, s) in enumerate(seqs):
        ids = torch.tensor(s.ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        labels[row, s.score_from - 1: len(ids) - 1] = ids[s.score_from:]
    n_slots = {len(ex.sequences) for ex in examples} or {1}
    if len(n_slots) != 1:
        raise ValueError("all examples of a batch must have the same number of suffixes")
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": labels,
        "seq_example": torch.tensor([i for i, _, _ in seqs], dtype=torch.long),
        "seq_slot": torch.tensor([slot for _, slot, _ in seqs], dtype=torch.long),
        "example_index": torch.tensor([ex.index for ex in examples], dtype=torch.long),
        "n_slots": n_slots.pop(),
        "truncated": torch.tensor([ex.truncated for ex in examples], dtype=torch.long),
        "is_text": torch.tensor([ex.is_text for ex in examples], dtype=torch.bool),
        "role": role,
    }


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Batches of examples whose padded size stays within a token budget.

    For evaluation (``shuffle=False``) examples are sorted by length so padding is small; results carry each
    example's file index, so order does not matter. Under DDP each rank takes every world-size-th batch: every
    example is seen exactly once (a DistributedSampler would pad with duplicates and bias the metrics).

    Args:
        lengths: tokens per example (longest sequence times sequences per example).
        max_tokens: budget of padded tokens per batch.
        max_examples: cap on examples per batch.
        shuffle: shuffle examples (training); batches then follow the shuffled order.
        seed: shuffle seed (combined with the epoch).
    """

    def __init__(self, lengths: list[int], max_tokens: int = 1024, max_examples: int = 64, shuffle: bool = False,
                 seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.max_tokens = max_tokens
        self.max_examples = max_examples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0
        """Batches to leave out at the start of the next iteration only (those a resumed run trained on already)."""

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle for a new epoch."""
        self.epoch = epoch

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        """Itself. Lightning calls ``set_epoch`` on a loader's ``sampler`` and on its ``batch_sampler.sampler``, never
        on the batch sampler: without this the training order would be the same in every epoch."""
        return self

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        else:
            order.sort(key=lambda i: -self.lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            new_longest = max(longest, self.lengths[i])
            if current and (new_longest * (len(current) + 1) > self.max_tokens or len(current) >= self.max_examples):
                batches.append(current)
                current, new_longest = [], self.lengths[i]
            current.append(i)
            longest = new_longest
        if current:
            batches.append(current)
        return batches

    def _shard(self) -> list[list[int]]:
        rank, world = _dist_info()
        batches = self._batches()
        if self.shuffle and world > 1 and len(batches) % world:
            # Training under DDP: every rank must take the same number of steps, so the last round is filled with
            # batches from the start (as DistributedSampler does). Evaluation never pads: no example counts twice.
            batches = batches + batches[: world - len(batches) % world]
        elif not self.shuffle and len(batches) < world:
            # Evaluation: every rank needs at least one batch (Lightning refuses an empty dataloader). Split the
            # largest batches; with fewer examples than ranks, the idle ranks get an empty batch that scores nothing.
            while len(batches) < world and max(len(b) for b in batches) > 1:
                big = max(range(len(batches)), key=lambda i: len(batches[i]))
                b = batches.pop(big)
                batches[big:big] = [b[: len(b) // 2], b[len(b) // 2:]]
            batches += [[] for _ in range(world - len(batches))]
        return batches[rank::world]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self._shard()[skip:]

    def __len__(self) -> int:
        return len(self._shard())

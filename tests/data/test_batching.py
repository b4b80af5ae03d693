"""Token-budget batching: every example exactly once (also when sharded across DDP ranks), budgets respected."""

from __future__ import annotations

import random

import pytest

import editing.data.batching as batching
from editing.data.batching import TokenBudgetBatchSampler, collate
from editing.data.tokenize import Sequence, TokenizedExample

LENGTHS = [random.Random(0).randint(3, 120) for _ in range(57)]


def _all(sampler) -> list[list[int]]:
    batches = list(iter(sampler))
    assert len(sampler) == len(batches)
    return batches


def test_eval_batches_cover_every_example_once_within_budget():
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=400, max_examples=5)
    batches = _all(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENGTHS)))
    for b in batches:
        assert len(b) <= 5
        assert max(LENGTHS[i] for i in b) * len(b) <= 400 or len(b) == 1
    # longest first, so that padding stays small
    assert [LENGTHS[i] for i in flat] == sorted(LENGTHS, reverse=True)
    assert _all(TokenBudgetBatchSampler(LENGTHS, max_tokens=400, max_examples=5)) == batches  # deterministic


def test_example_longer_than_budget_gets_its_own_batch():
    batches = _all(TokenBudgetBatchSampler([10, 500, 20], max_tokens=100, max_examples=64))
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


@pytest.mark.parametrize("world", [2, 3])
def test_eval_sharding_has_no_duplicates(monkeypatch, world):
    shards = []
    for rank in range(world):
        monkeypatch.setattr(batching, "_dist_info", lambda rank=rank: (rank, world))
        shards.append([i for b in _all(TokenBudgetBatchSampler(LENGTHS, 300, 4)) for i in b])
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(len(LENGTHS)))  # each example on exactly one rank


def test_training_shuffle_is_seeded_and_changes_per_epoch():
    a = TokenBudgetBatchSampler(LENGTHS, max_tokens=1 << 30, max_examples=1, shuffle=True, seed=3)
    b = TokenBudgetBatchSampler(LENGTHS, max_tokens=1 << 30, max_examples=1, shuffle=True, seed=3)
    first = _all(a)
    assert first == _all(b)
    assert sorted(i for batch in first for i in batch) == list(range(len(LENGTHS)))
    a.set_epoch(1)
    assert _all(a) != first


def test_training_shards_take_equal_steps(monkeypatch):
    lens = []
    for rank in range(2):
        monkeypatch.setattr(batching, "_dist_info", lambda rank=rank: (rank, 2))
        lens.append(len(TokenBudgetBatchSampler(LENGTHS, 1 << 30, 1, shuffle=True)))
    assert lens[0] == lens[1] == (len(LENGTHS) + 1) // 2


def test_collate_rejects_mixed_suffix_counts():
    single = TokenizedExample(0, [Sequence([1, 2, 3], 2)])
    pair = TokenizedExample(1, [Sequence([1, 2], 1), Sequence([1, 4], 1)])
    with pytest.raises(ValueError, match="same number of suffixes"):
        collate([single, pair])


def test_collate_pads_right_and_carries_indices():
    a = TokenizedExample(7, [Sequence([5, 6, 7, 8], 3)], truncated=2)
    b = TokenizedExample(3, [Sequence([9, 10], 1)])
    batch = collate([a, b], role="evaluation", pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 8, -100], [10, -100, -100, -100]]
    assert batch["example_index"].tolist() == [7, 3] and batch["truncated"].tolist() == [2, 0]
    assert batch["role"] == "evaluation" and batch["n_slots"] == 1

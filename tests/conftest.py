"""Shared fixtures: the read-only task data, tiny random models loaded once per session, and reference helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-backpack")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared task data (read-only; never copied into the repository)."""
    if not (SHARED_DATA / "general" / "degradation.jsonl").is_file():
        pytest.skip(f"task data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_module():
    """``tiny_module(name)``: an fp32 ``EditingModule`` of a tiny random family, built once per session.

    Tests must not change its weights; ``evaluate`` rebinds the task and resets the metrics itself.
    """
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    cache: dict[str, EditingModule] = {}

    def get(name: str) -> EditingModule:
        if name not in cache:
            cache[name] = EditingModule(ModelConfig(name=name, precision="fp32"))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tokenizer_of():
    """``tokenizer_of(alias)`` for ``gpt2``, ``neox`` and ``smollm2`` (offline, cached)."""
    from editing.models.loading import _offline_tokenizer

    cache: dict = {}

    def get(alias: str):
        if alias not in cache:
            cache[alias] = _offline_tokenizer(alias)
        return cache[alias]

    return get


def reference_scores(model, examples, loss: str) -> torch.Tensor:
    """Scores of the one-at-a-time reference loop (float64), in the order of ``examples``."""
    from editing.evaluation.reference import reference_example_nll
    from editing.losses import example_score

    sums = torch.tensor([reference_example_nll(model, e) for e in examples], dtype=torch.float64)
    return example_score(sums, loss)


def reference_text_stats(model, examples) -> tuple[float, int]:
    """(sum of scored-token NLL, number of scored tokens) of text examples, by the reference loop."""
    from editing.evaluation.reference import reference_example_nll

    total, tokens = 0.0, 0
    for e in examples:
        (s,) = reference_example_nll(model, e)
        total += s
        tokens += len(e.sequences[0].ids) - e.sequences[0].score_from
    return total, tokens


@pytest.fixture
def offline_hub(monkeypatch):
    """No network: the hub is unreachable and huggingface_hub works from its cache only."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return os.environ

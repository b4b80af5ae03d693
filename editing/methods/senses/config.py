"""Sense finetuning settings (SPEC section 8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SensesConfig:
    """Which sense vectors to finetune: selected by alpha importance against the background set R."""

    senses_per_example: int = 8
    """Top-k (word, sense) pairs kept per canonical example (the sweep draws U{5..11})."""
    selection_lambda: float = 1000.0
    """Weight of the background usage: importance = score - lambda x background (the sweep draws 10^U(2, 3.5))."""
    selection: Literal["per_example", "overall"] = "per_example"
    """``per_example``: the union of each example's top ``senses_per_example``; ``overall``: the top
    ``total_senses`` pairs by their largest importance over all examples."""
    total_senses: int | None = None
    """Number of pairs for ``selection: overall`` (default: ``senses_per_example`` x examples)."""
    background_limit: int | None = None
    """Use only the first N texts of R for the background statistics (default: all of R)."""
    background_batch_texts: int = 8
    """Texts of R per forward pass while computing the background (memory only; the result does not depend on it)."""

"""Locality: how many hard negatives an edit leaves alone, as a rate a practitioner reads.

A hard negative is *preserved* when the edited model gives its true completion at least half the probability the
unedited model p0 gave it: its value (the suffix NLL sum of a suffix line, the token-mean NLL of a text line, as in
``hard_negative_nll``) rises by at most ``ln 2`` nats from p0's. The locality is the fraction of hard negatives
preserved (1.0 at p0). A NaN or infinite value is never preserved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

LOCALITY_TOLERANCE = math.log(2.0)
"""How far (nats) a hard negative's value may rise from p0's and still count as preserved: its true completion keeps
at least half of p0's probability."""


def hard_negative_values(per_example: Iterable[Mapping]) -> dict[int, float]:
    """``{index: value}`` from an evaluation summary's ``per_example_hard_negatives``."""
    return {int(p["index"]): float(p["value"]) for p in per_example}


def preserved_rate(reference: Mapping[int, float], current: Mapping[int, float],
                   tolerance: float = LOCALITY_TOLERANCE) -> float | None:
    """The fraction of p0's hard negatives that the current model preserves (see the module's docstring).

    Args:
        reference: p0's value per hard-negative index.
        current: the current model's value per index (an index it lacks counts as not preserved).
        tolerance: the largest rise, in nats, that still counts as preserved.

    Returns:
        The rate in [0, 1], or None when there are no hard negatives.
    """
    if not reference:
        return None
    kept = 0
    for index, before in reference.items():
        after = current.get(index)
        if after is not None and math.isfinite(before) and math.isfinite(after) and after - before <= tolerance:
            kept += 1
    return kept / len(reference)


__all__ = ["LOCALITY_TOLERANCE", "hard_negative_values", "preserved_rate"]

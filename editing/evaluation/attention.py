"""Scaled-dot-product attention in IEEE fp32 inside a faster product mode (issue 37).

A product mode (``editing.evaluation.products``) is chosen for the linear layers and the LM head: their shapes are
what it times. Its switches are global, though, and torch's CPU flash-attention kernel runs its small block
products through them too. On an AMD EPYC (AVX512-BF16, no AMX) oneDNN's bf16 math mode computes those blocks with
fp32's error but 2.5x slower than IEEE (a batch of 9 texts of 105 tokens: 8.6 ms a call against 3.5 ms; 17% of an
evaluation pass), because every block becomes a oneDNN call of its own. So inside ``evaluation_products`` the
attention function that transformers' models call by name ``sdpa`` runs under ``full_precision`` (IEEE fp32, the
default's kernels): the attention's numbers are the default mode's, whatever mode the products take.

The swap goes through transformers' ``AttentionInterface`` registry (the function models look up by name on every
forward) and is undone on leaving; nested contexts wrap once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps

from editing.evaluation.precision import full_precision

NAME = "sdpa"
"""The registry entry wrapped: transformers' name of ``torch.nn.functional.scaled_dot_product_attention``."""


def _registry() -> dict | None:
    """transformers' global mapping of attention functions, or None when this transformers has none."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    mapping = getattr(ALL_ATTENTION_FUNCTIONS, "_global_mapping", None)
    return mapping if isinstance(mapping, dict) else None


def _at_ieee(function):
    @wraps(function)
    def attention(*args, **kwargs):
        with full_precision():
            return function(*args, **kwargs)

    attention.ieee_of = function
    return attention


@contextmanager
def attention_at_ieee(enabled: bool = True) -> Iterator[bool]:
    """Within the context, transformers' ``sdpa`` attention runs in IEEE fp32 (``full_precision``) whatever
    product mode is set around it; yields whether the swap is in effect.

    Args:
        enabled: False leaves the attention as it is (the default mode: IEEE already).
    """
    mapping = _registry()
    original = mapping.get(NAME) if mapping is not None else None
    if not enabled or original is None or hasattr(original, "ieee_of"):  # off, absent, or an outer context's
        yield bool(enabled and original is not None)
        return
    mapping[NAME] = _at_ieee(original)
    try:
        yield True
    finally:
        mapping[NAME] = original


__all__ = ["NAME", "attention_at_ieee"]

"""Regularization toward the unedited model p0 (SPEC section 4): KL(p0 || p), L2 and EWC."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from editing.evaluation.scorer import HEAD_CHUNK, capture_final_hidden, head_logits

REGULARIZERS: tuple[str, ...] = ("kl", "l2", "ewc", "none")


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The LM head's input for every position of ``batch`` (the head itself is skipped)."""
    with capture_final_hidden(model) as store:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return store["hidden"]


def kl_to_reference(model, reference: Callable[[], AbstractContextManager], batch: dict) -> torch.Tensor:
    """KL(p0 || p) summed over real (non-padding) positions and the vocabulary, divided by the number of sequences.

    Args:
        model: the model being edited (p).
        reference: a context-manager factory yielding the unedited model p0 (a frozen copy, or ``model`` itself
            with its edit switched off).
        batch: a padded batch of general texts.

    Returns:
        A scalar (fp32).
    """
    mask = batch["attention_mask"].bool()
    with torch.no_grad(), reference() as ref_model:
        ref_hidden = final_hidden(ref_model, batch)[mask]
        ref_logp = [torch.log_softmax(head_logits(ref_model, ref_hidden[s: s + HEAD_CHUNK]), dim=-1)
                    for s in range(0, ref_hidden.shape[0], HEAD_CHUNK)]
    hidden = final_hidden(model, batch)[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for i, start in enumerate(range(0, hidden.shape[0], HEAD_CHUNK)):
        logp = torch.log_softmax(head_logits(model, hidden[start: start + HEAD_CHUNK]), dim=-1)
        logq = ref_logp[i]
        total = total + (logq.exp() * (logq - logp)).sum()
    return total / batch["input_ids"].shape[0]


def l2_to_reference(params: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of squared differences between trainable parameters and their values in p0."""
    total = None
    for name, p in params.items():
        term = (p.float() - initial[name].float()).pow(2).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def ewc_penalty(params: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Elastic weight consolidation: sum of Fisher-weighted squared differences from p0."""
    total = None
    for name, p in params.items():
        term = (fisher[name] * (p.float() - initial[name].float()).pow(2)).sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())

"""Batched scoring: NLL of the scored tokens, with logits computed only at the scored positions.

The model runs once per padded batch; a pre-hook on the output embedding captures the final hidden states
(``editing.models.architecture.capture_final_hidden``), so the LM head is applied only at positions that predict a
scored token (for a long prefix and a short suffix that is a few rows instead of the whole sequence). The head matmul,
log-softmax and NLL run in fp32. Autocast would override that (a bf16-mixed training step scores its loss in bf16, as
it may); evaluation calls these functions inside ``editing.evaluation.precision.full_precision``, where autocast is
off.
"""

from __future__ import annotations

import torch

from editing.data.batching import IGNORE
from editing.models.architecture import capture_final_hidden, head_logits

__all__ = ["HEAD_CHUNK", "capture_final_hidden", "example_nll", "head_logits", "sequence_nll", "token_nll"]

HEAD_CHUNK = 2048  # positions per fp32 head matmul, bounding memory at HEAD_CHUNK x vocab floats


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[
        torch.Tensor, torch.Tensor]:
    """NLL of every scored token in a right-padded batch.

    Args:
        model: a causal LM (Hugging Face interface).
        input_ids: (b, s) token ids.
        attention_mask: (b, s) 1 for real tokens.
        labels: (b, s) the token each position predicts, -100 where not scored.

    Returns:
        ``nll`` (n,) fp32 NLL of the n scored tokens, and ``rows`` (n,) the batch row of each.
    """
    with capture_final_hidden(model) as store:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = store["hidden"]
    mask = labels != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    selected = hidden[mask]
    targets = labels[mask]
    pieces = []
    for start in range(0, selected.shape[0], HEAD_CHUNK):
        logits = head_logits(model, selected[start: start + HEAD_CHUNK])
        tgt = targets[start: start + HEAD_CHUNK]
        pieces.append(torch.logsumexp(logits, dim=-1) - logits.gather(1, tgt[:, None]).squeeze(1))
    nll = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return nll, rows


def sequence_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of scored-token NLL (float64) and scored-token count."""
    nll, rows = token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts


def example_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example, per-suffix NLL sums and token counts: shapes (examples, suffixes)."""
    sums, counts = sequence_nll(model, batch)
    n_examples = batch["example_index"].shape[0]
    out_sums = torch.zeros(n_examples, batch["n_slots"], dtype=torch.float64, device=sums.device)
    out_counts = torch.zeros(n_examples, batch["n_slots"], dtype=torch.long, device=sums.device)
    out_sums[batch["seq_example"], batch["seq_slot"]] = sums
    out_counts[batch["seq_example"], batch["seq_slot"]] = counts
    return out_sums, out_counts

"""Batched scoring: NLL of the scored tokens, with logits computed only at the scored positions.

The model runs once per padded batch; a pre-hook on the output embedding captures the final hidden states
(``editing.models.architecture.capture_final_hidden``), so the LM head is applied only at positions that predict a
scored token (for a long prefix and a short suffix that is a few rows instead of the whole sequence). The head matmul,
log-softmax and NLL run in fp32. Autocast would override that (a bf16-mixed training step scores its loss in bf16, as
it may); evaluation calls these functions inside ``editing.evaluation.precision.full_precision``, where autocast is
off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from editing.data.batching import IGNORE
from editing.models.architecture import capture_final_hidden, head_logits

__all__ = ["HEAD_CHUNK", "TokenScorer", "capture_final_hidden", "example_nll", "head_logits", "head_nll",
           "needed_mask", "row_logsumexp", "scored_nll", "sequence_nll", "token_nll"]

HEAD_CHUNK = 2048  # positions per fp32 head matmul, bounding memory at HEAD_CHUNK x vocab floats
LSE_BYTES_PER_THREAD = 1 << 20
"""Logits per thread that one ``logsumexp`` call reads (see ``row_logsumexp``): a quarter of a core's L2 cache on the
CPUs measured (2 MiB per core), so that its four passes over them (max, subtract, exp, sum) hit L2, not memory."""

TokenScorer = Callable[[object, dict], tuple[torch.Tensor, torch.Tensor]]
"""``(model, batch) -> (nll, rows)`` as ``token_nll`` computes them for a batch: what ``sequence_nll`` and
``example_nll`` sum up. The evaluation caches (``editing.evaluation.incremental``) supply their own."""


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
        model(input_ids=input_ids, attention_mask=needed_mask(attention_mask), use_cache=False)
    return scored_nll(model, store["hidden"], labels)


def needed_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The padding mask a causal LM needs for this batch's scored positions: none when every row is right-padded.

    In a right-padded row every real token comes before every pad, and causal attention lets a position see only
    earlier ones, so no real position sees a pad: the mask changes only the pads' own outputs, which are never
    scored. Without it the attention runs its causal kernel instead of an explicitly masked one (issue 37: the
    same bits on SmolLM2, and the attention, a fifth of a 2-thread pass, faster). Any other padding (left, holes)
    keeps its mask.
    """
    if attention_mask is None or attention_mask.shape[-1] < 2:
        return None if attention_mask is None or bool(attention_mask.all()) else attention_mask
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    return attention_mask


def scored_nll(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of the scored tokens from the LM head's input ``hidden`` (b, s, d): the second half of ``token_nll``.

    Returns:
        ``nll`` (n,) in fp32 and ``rows`` (n,), scored positions in row-major order.
    """
    mask = labels != IGNORE
    rows = mask.nonzero(as_tuple=True)[0]
    nll = head_nll(model, hidden[mask], labels[mask])
    return nll, rows


def head_nll(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """fp32 NLL of ``targets`` (n,) under the LM head applied to ``hidden`` (n, d), ``HEAD_CHUNK`` rows at a time."""
    pieces = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        logits = head_logits(model, hidden[start: start + HEAD_CHUNK])
        tgt = targets[start: start + HEAD_CHUNK]
        pieces.append(row_logsumexp(logits) - logits.gather(1, tgt[:, None]).squeeze(1))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, -1)`` of (n, V) fp32 logits, on a CPU a few rows at a time.

    ``logsumexp`` makes four passes over its input, each writing or reading all of it; over a (1000, 49152) block of
    logits (189 MB) every pass goes to memory and the call costs as much as a tenth of the evaluation pass. Rows in
    chunks of ``LSE_BYTES_PER_THREAD`` per thread stay in cache from pass to pass: 4-5x faster on the Xeon measured
    (docs/results.md, "Evaluation speed (issue 37, third part)"). Each row's value is computed by the same kernel,
    only over fewer rows at once, so it agrees with the unchunked call to fp32 rounding. Under autograd (the ``out=``
    form has no gradient) and off the CPU it is the plain call.
    """
    n, vocab = logits.shape
    rows = max(1, LSE_BYTES_PER_THREAD * torch.get_num_threads() // max(1, vocab * logits.element_size()))
    if rows >= n or logits.device.type != "cpu" or (torch.is_grad_enabled() and logits.requires_grad):
        return torch.logsumexp(logits, dim=-1)
    out = logits.new_empty(n)
    for start in range(0, n, rows):
        torch.logsumexp(logits[start: start + rows], dim=-1, out=out[start: start + rows])
    return out


def _batch_token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def sequence_nll(model, batch: dict, scorer: TokenScorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of scored-token NLL (float64) and scored-token count (the tokens' NLL from ``scorer``,
    default ``token_nll``)."""
    nll, rows = (scorer or _batch_token_nll)(model, batch)
    n = batch["input_ids"].shape[0]
    sums = torch.zeros(n, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
    counts = torch.zeros(n, dtype=torch.long, device=nll.device).index_add_(0, rows, torch.ones_like(rows))
    return sums, counts


def example_nll(model, batch: dict, scorer: TokenScorer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example, per-suffix NLL sums and token counts: shapes (examples, suffixes)."""
    sums, counts = sequence_nll(model, batch, scorer)
    n_examples = batch["example_index"].shape[0]
    out_sums = torch.zeros(n_examples, batch["n_slots"], dtype=torch.float64, device=sums.device)
    out_counts = torch.zeros(n_examples, batch["n_slots"], dtype=torch.long, device=sums.device)
    out_sums[batch["seq_example"], batch["seq_slot"]] = sums
    out_counts[batch["seq_example"], batch["seq_slot"]] = counts
    return out_sums, out_counts

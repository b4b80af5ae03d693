"""The plain evaluation loop the paper's code uses: one sequence at a time, full fp32 logits.

Kept as the reference our batched scorer is tested and benchmarked against.
"""

from __future__ import annotations

import torch

from editing.data.tokenize import TokenizedExample


@torch.no_grad()
def reference_example_nll(model, example: TokenizedExample) -> list[float]:
    """Sum of suffix-token NLL for each sequence of ``example``, one forward pass per sequence."""
    sums = []
    for seq in example.sequences:
        ids = torch.tensor([seq.ids], dtype=torch.long)
        logits = model(input_ids=ids).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = ids[0, seq.score_from:]
        picked = logprobs[seq.score_from - 1: len(seq.ids) - 1].gather(1, targets[:, None]).squeeze(1)
        sums.append(float(-picked.double().sum()))
    return sums

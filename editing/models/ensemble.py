"""The ensemble that carries a Backpack's edit to a larger model with the same tokenizer (SPEC section 9).

log p_ens = log p_large + beta x (log p_backpack_edited - log p_backpack_base), over the shared vocabulary and
renormalised by the scorer's log-softmax. With beta = 0 the ensemble's logits are the large model's own (cut to the
shared vocabulary), so its scores equal the large model's exactly.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from editing.errors import ConfigError
from editing.evaluation.scorer import capture_final_hidden, head_logits


def shared_vocabulary(large_tokenizer, backpack_tokenizer) -> int:
    """The number of leading token ids both tokenizers map to the same strings.

    Raises:
        ConfigError: when the tokenizers differ (an ensemble over different vocabularies is meaningless).
    """
    large, small = large_tokenizer.get_vocab(), backpack_tokenizer.get_vocab()
    base = min(len(large_tokenizer), len(backpack_tokenizer))
    by_id_large = {i: t for t, i in large.items() if i < base}
    by_id_small = {i: t for t, i in small.items() if i < base}
    differing = [i for i in range(base) if by_id_large.get(i) != by_id_small.get(i)]
    if differing:
        i = differing[0]
        raise ConfigError(
            f"the ensemble needs one tokenizer: the large model's and the Backpack's differ at {len(differing)} of "
            f"the first {base} ids (e.g. id {i}: {by_id_large.get(i)!r} vs {by_id_small.get(i)!r})"
        )
    return base


class EnsembleHead(nn.Module):
    """Turns the three models' final hidden states (concatenated) into ensemble logits."""

    def __init__(self, ensemble: EnsembleLM) -> None:
        super().__init__()
        object.__setattr__(self, "ensemble", ensemble)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits_from_hidden(hidden)

    def logits_from_hidden(self, hidden: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """Ensemble logits (fp32) from concatenated hidden states (..., d_large + 2 d_backpack)."""
        e = self.ensemble
        beta = e.beta if beta is None else beta
        d_large, d_small = e.large_width, e.backpack_width
        h_large = hidden[..., :d_large]
        logits = head_logits(e.large, h_large.reshape(-1, d_large))[:, : e.vocab]
        if beta != 0.0:
            h_edit = hidden[..., d_large: d_large + d_small].reshape(-1, d_small)
            h_base = hidden[..., d_large + d_small:].reshape(-1, d_small)
            edit = F.log_softmax(head_logits(e.backpack, h_edit)[:, : e.vocab], dim=-1)
            base = F.log_softmax(head_logits(e.backpack, h_base)[:, : e.vocab], dim=-1)
            logits = logits + beta * (edit - base)
        return logits.view(*hidden.shape[:-1], e.vocab)


class EnsembleLM(nn.Module):
    """A causal LM the evaluator can score: a large model plus beta times a Backpack edit's log-probability change.

    Args:
        large: the large causal LM.
        backpack: the Backpack (carrying an installed sense edit, or any edit whose p0 ``backpack_reference``
            yields).
        backpack_reference: a context manager factory within which ``backpack`` computes its unedited
            distribution (for sense edits: the deltas switched off).
        vocab: the shared vocabulary size (``shared_vocabulary``).
        beta: the edit's weight.
    """

    def __init__(self, large: nn.Module, backpack: nn.Module, backpack_reference, vocab: int,
                 beta: float = 1.0) -> None:
        super().__init__()
        self.large = large
        self.backpack = backpack
        self.backpack_reference = backpack_reference
        self.vocab = vocab
        self.beta = beta
        self.large_width = large.get_output_embeddings().weight.shape[1]
        self.backpack_width = backpack.get_output_embeddings().weight.shape[1]
        self.head = EnsembleHead(self)
        self.config = large.config
        # evaluation only: built in eval mode, so that restoring "the mode it had" never turns dropout on
        self.eval()

    def get_output_embeddings(self) -> EnsembleHead:
        return self.head

    def _hidden(self, model, input_ids, attention_mask) -> torch.Tensor:
        with capture_final_hidden(model) as store:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return store["hidden"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> dict:
        parts = [self._hidden(self.large, input_ids, attention_mask)]
        if self.beta != 0.0:
            parts.append(self._hidden(self.backpack, input_ids, attention_mask))
            with self.backpack_reference():
                parts.append(self._hidden(self.backpack, input_ids, attention_mask))
        else:  # the Backpack does not matter at beta 0; zeros keep the layout
            zeros = parts[0].new_zeros(*parts[0].shape[:-1], self.backpack_width)
            parts += [zeros, zeros]
        hidden = torch.cat([p.float() for p in parts], dim=-1)
        return {"logits": self.head(hidden)}


@contextmanager
def beta_set_to(ensemble: EnsembleLM, beta: float):
    """Temporarily evaluate ``ensemble`` at ``beta``."""
    old = ensemble.beta
    ensemble.beta = beta
    try:
        yield ensemble
    finally:
        ensemble.beta = old

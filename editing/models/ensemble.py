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

from editing.core.errors import ConfigError
from editing.models.architecture import capture_final_hidden, head_logits


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

    def parts_from_hidden(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The large model's logits and the edit's log-probability change, both fp32 over the shared vocabulary,
        from concatenated hidden states (n, d_large + 2 d_backpack); the ensemble's logits at beta are
        ``large + beta * change``."""
        e = self.ensemble
        d_large, d_small = e.large_width, e.backpack_width
        large = head_logits(e.large, hidden[:, :d_large])[:, : e.vocab]
        h_edit = hidden[:, d_large: d_large + d_small]
        h_base = hidden[:, d_large + d_small:]
        edit = F.log_softmax(head_logits(e.backpack, h_edit)[:, : e.vocab], dim=-1)
        # the base distribution's head is the reference model's own: a full-finetuning edit keeps p0 as a separate
        # model, and an edit of changed tensors swaps the head's base values back only inside the context
        with e.backpack_reference() as base:
            base_logprobs = F.log_softmax(head_logits(base, h_base)[:, : e.vocab], dim=-1)
        return large, edit - base_logprobs

    def logits_from_hidden(self, hidden: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """Ensemble logits (fp32) from concatenated hidden states (..., d_large + 2 d_backpack)."""
        e = self.ensemble
        beta = e.beta if beta is None else beta
        flat = hidden.reshape(-1, hidden.shape[-1])
        if beta == 0.0:  # exactly the large model's logits (its scores equal the large model's own)
            logits = head_logits(e.large, flat[:, : e.large_width])[:, : e.vocab]
        else:
            large, change = self.parts_from_hidden(flat)
            logits = large + beta * change
        return logits.view(*hidden.shape[:-1], e.vocab)


class EnsembleLM(nn.Module):
    """A causal LM the evaluator can score: a large model plus beta times a Backpack edit's log-probability change.

    Args:
        large: the large causal LM.
        backpack: the edited Backpack (carrying an installed sense edit, changed weights, an adapter, ...).
        backpack_reference: a context manager factory yielding the model that computes the Backpack's unedited
            distribution p0 (the edit's ``reference``): the same model with the edit switched off, or a separate
            copy (full finetuning keeps the base weights in a frozen copy). The ensemble runs the model it yields.
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

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      with_backpack: bool = True) -> torch.Tensor:
        """The final hidden states of the large model, the edited Backpack and the base Backpack (the model
        ``backpack_reference`` yields), concatenated in fp32: (b, s, d_large + 2 d_backpack). Without
        ``with_backpack`` the Backpack parts are zeros (at beta 0 they do not matter)."""
        parts = [self._hidden(self.large, input_ids, attention_mask)]
        if with_backpack:
            parts.append(self._hidden(self.backpack, input_ids, attention_mask))
            with self.backpack_reference() as base:
                parts.append(self._hidden(base, input_ids, attention_mask))
        else:
            zeros = parts[0].new_zeros(*parts[0].shape[:-1], self.backpack_width)
            parts += [zeros, zeros]
        return torch.cat([p.float() for p in parts], dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_) -> dict:
        hidden = self.hidden_states(input_ids, attention_mask, with_backpack=self.beta != 0.0)
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

"""The general NLL of an edit on a growing sample of G (issue 36 item 6; the rule: ``editing.rules.sampling``).

``SampledGeneral`` scores the texts of the general set G one sample at a time: the texts join in a seeded, fixed
order (``sample_order``), p0's summed NLL of each text is computed once and kept (``p0``, saved in the fit's
checkpoints by the callback), and ``measure`` scores the edit on the first ``n`` texts, doubling ``n`` until the
interval of the degradation clears every ball's edge or G is used up (then it is the exact degradation on all of G).
The texts are scored as the Evaluator scores G (``sequence_nll`` in full fp32 with the evaluation products); the
sums are per text, which the Evaluator's token-mean metric does not keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from editing.data.batching import collate
from editing.evaluation.precision import full_precision
from editing.evaluation.products import evaluation_products
from editing.evaluation.scorer import sequence_nll
from editing.rules.sampling import DEFAULT_LEVEL, Interval, ratio_interval, sample_order, sample_sizes

GENERAL_ROLE = "general"


class SampledGeneral:
    """Per-text NLL sums of G's texts, p0's kept, and the growth of the sample.

    Args:
        datamodule: the task's DataModule (attached to the model's tokenizer); its ``general`` set is G.
        first: the first sample size (``editing.rules.sampling.parse_general_sample``).
        seed: the seed of the texts' order.
        level: the interval's confidence level.
        max_tokens: padded-token budget of a batch (default: the DataModule's).
        max_examples: most texts in a batch (default: the DataModule's).
    """

    def __init__(self, datamodule, first: int, seed: int = 0, level: float = DEFAULT_LEVEL,
                 max_tokens: int | None = None, max_examples: int | None = None) -> None:
        self.examples = datamodule.load(GENERAL_ROLE).examples
        self.pad_id = datamodule.pad_id
        self.total = len(self.examples)
        self.order = sample_order(self.total, seed)
        self.sizes = sample_sizes(self.total, first)
        self.level = level
        self.max_tokens = max_tokens or datamodule.max_tokens
        self.max_examples = max_examples or datamodule.max_examples
        self.p0: dict[int, float] = {}
        """p0's summed NLL per text index of G (the texts scored so far)."""
        self.tokens: dict[int, int] = {}
        """The scored tokens per text index."""

    def _batches(self, indices: Sequence[int]) -> Iterator[list[int]]:
        """The indices grouped into batches within the token budget (by length, so padding stays small)."""
        batch: list[int] = []
        longest = 0
        for i in sorted(indices, key=lambda j: self.examples[j].length):
            length = max(longest, self.examples[i].length)
            if batch and (length * (len(batch) + 1) > self.max_tokens or len(batch) >= self.max_examples):
                yield batch
                batch, length = [], self.examples[i].length
            batch.append(i)
            longest = length
        if batch:
            yield batch

    @torch.no_grad()
    def text_sums(self, model: nn.Module, indices: Sequence[int]) -> dict[int, float]:
        """Per text index: the summed NLL of its scored tokens under ``model`` (float64; also records ``tokens``)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out: dict[int, float] = {}
        try:
            with full_precision(), evaluation_products(device):
                for group in self._batches(indices):
                    batch = collate([self.examples[i] for i in group], role=GENERAL_ROLE, pad_id=self.pad_id)
                    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    sums, counts = sequence_nll(model, batch)
                    per_text = torch.zeros(len(group), dtype=torch.float64, device=sums.device)
                    per_text.index_add_(0, batch["seq_example"], sums)
                    n_tokens = torch.zeros(len(group), dtype=torch.long, device=sums.device)
                    n_tokens.index_add_(0, batch["seq_example"], counts)
                    for i, s, c in zip(group, per_text.tolist(), n_tokens.tolist(), strict=True):
                        out[i] = s
                        self.tokens[i] = int(c)
        finally:
            model.train(was_training)
        return out

    def p0_nll(self, reference: Callable[[], AbstractContextManager[nn.Module]], n: int | None = None) -> float:
        """p0's general NLL (token mean) on the first ``n`` texts of the order (default: the first sample),
        computing the texts p0 has not scored yet inside ``reference()``."""
        chosen = self.order[: self.sizes[0] if n is None else n]
        self._fill_p0(reference, chosen)
        return sum(self.p0[i] for i in chosen) / max(1, sum(self.tokens[i] for i in chosen))

    def _fill_p0(self, reference: Callable[[], AbstractContextManager[nn.Module]], chosen: Iterable[int]) -> None:
        missing = [i for i in chosen if i not in self.p0]
        if missing:
            with reference() as model:
                self.p0.update(self.text_sums(model, missing))

    def measure(self, model: nn.Module, reference: Callable[[], AbstractContextManager[nn.Module]],
                balls: Iterable[float]) -> Interval:
        """The edit's degradation on a sample grown until its interval clears every ball's edge, or all of G.

        Args:
            model: the edited model.
            reference: a context yielding the model that computes p0 (the method's ``reference()``).
            balls: the balls' eps values.

        Returns:
            The interval of the last sample scored (``texts`` is its size; ``exact`` when it is all of G).
        """
        balls = list(balls)
        edit: dict[int, float] = {}
        done = 0
        interval = None
        for n in self.sizes:
            new = self.order[done:n]
            edit.update(self.text_sums(model, new))
            self._fill_p0(reference, new)
            done = n
            chosen = self.order[:n]
            interval = ratio_interval([edit[i] for i in chosen], [self.p0[i] for i in chosen], self.total, self.level)
            if interval.clears(balls):
                break
        assert interval is not None  # sizes is never empty (G has texts)
        return interval

    def state_dict(self) -> dict:
        """p0's per-text sums and token counts, for a checkpoint (a resumed fit does not score them again)."""
        return {"p0": dict(self.p0), "tokens": dict(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        self.p0 = {int(k): float(v) for k, v in state.get("p0", {}).items()}
        self.tokens = {int(k): int(v) for k, v in state.get("tokens", {}).items()}


__all__ = ["SampledGeneral"]

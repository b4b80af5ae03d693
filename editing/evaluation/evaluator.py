"""The evaluation loop (SPEC section 5): an ``Evaluator`` holds the torchmetrics metrics of one task, scores batches
of its evaluation roles with a model, and sums them up (synchronised across processes) with per-example scores.

Everything that measures a model goes through it: Lightning's validation and test steps (``EditingModule``), the
DegradationBudget callback's evaluation of each epoch, ``editing evaluate``/``editing apply`` and the ensemble search
(through ``evaluate``). It needs only the model: a method's deltas act inside the model's forward pass.
"""

from __future__ import annotations

import logging
import sys
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from editing.evaluation.backend import PACKED
from editing.evaluation.metrics import ExampleMeanNLL, ExampleScores, SuccessRate, TokenMeanNLL, failed
from editing.evaluation.packed import packed_linears
from editing.evaluation.precision import full_precision
from editing.evaluation.products import evaluation_products
from editing.evaluation.scorer import TokenScorer, example_nll, sequence_nll
from editing.rules.losses import example_score
from editing.rules.tasks import TaskSpec

log = logging.getLogger(__name__)

METRIC_NAMES = ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll")
# what a practitioner reads beside the paper's metrics: the success rate and mean score on the canonical examples
# themselves (scored when the "canonical" role is evaluated), and the mean score on the evaluation set
PRACTITIONER_NAMES = ("reliability", "reliability_mean_score", "generalization_mean_score")


class Evaluable(Protocol):
    """What ``evaluate`` needs: a model with its tokenizer and context length (an ``EditingModule``, a
    ``LoadedModel``, an edited model from ``editing.edits.load.load_edited``)."""

    model: nn.Module
    tokenizer: object
    max_length: int


class Evaluator(nn.Module):
    """The metrics of one task's evaluation and the loop that fills them.

    A ``nn.Module`` so that the metrics follow the model across devices when it is a submodule of a LightningModule.

    Args:
        task: the task whose loss and threshold score its examples.
    """

    def __init__(self, task: TaskSpec) -> None:
        super().__init__()
        self.task = task
        self.metrics = nn.ModuleDict({
            "success_rate": SuccessRate(task.threshold),
            "general_nll": TokenMeanNLL(),
            "targeted_nll": TokenMeanNLL(),
            "hard_negative_nll": ExampleMeanNLL(),
            "scores": ExampleScores(),
            "reliability": SuccessRate(task.threshold),
            "reliability_mean_score": ExampleMeanNLL(),  # a mean of per-example values: here scores
            "generalization_mean_score": ExampleMeanNLL(),
            "hard_negative_values": ExampleScores(),  # per-example values, for locality (preserved vs p0)
        })
        self.scorer: TokenScorer | None = None
        """Scores a batch's tokens in place of ``token_nll`` (an evaluation cache's, see ``run``); None: a forward
        pass of the whole model."""

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict) -> None:
        """Score one evaluation batch with ``model`` (in full fp32, see ``full_precision``, with the machine's
        fastest exact products, see ``editing.evaluation.products``) and update the metric of its role."""
        if batch["input_ids"].numel() == 0:  # an empty shard under DDP (fewer examples than processes)
            return
        # under --trainer.precision bf16-mixed, Lightning runs validation/test steps in autocast
        with full_precision(), evaluation_products(batch["input_ids"].device):
            self._update(model, batch)

    def _update(self, model: nn.Module, batch: dict) -> None:
        role = batch["role"]
        m = self.metrics
        if role == "evaluation":
            sums, _ = example_nll(model, batch, self.scorer)
            scores = example_score(sums, self.task.loss)
            m["success_rate"].update(scores)
            m["scores"].update(batch["example_index"], scores)
            m["generalization_mean_score"].update(scores)
        elif role == "canonical":
            sums, _ = example_nll(model, batch)
            scores = example_score(sums, self.task.loss)
            m["reliability"].update(scores)
            m["reliability_mean_score"].update(scores)
        elif role in ("general", "targeted"):
            sums, counts = sequence_nll(model, batch, self.scorer)
            m[f"{role}_nll"].update(sums, counts)
        elif role == "hard_negatives":
            sums, counts = example_nll(model, batch, self.scorer)
            # suffix lines: the suffix NLL sum; text lines: the text's token-mean NLL (SPEC section 5)
            values = torch.where(batch["is_text"], sums[:, 0] / counts[:, 0].clamp(min=1), sums[:, 0])
            m["hard_negative_nll"].update(values)
            m["hard_negative_values"].update(batch["example_index"], values)
        else:
            raise ValueError(f"unknown evaluation role {role!r}")

    def _update_unseen_with_nothing(self) -> None:
        """Update every metric that saw no example with an empty batch, so that each process's compute (a collective
        under DDP) runs, also on a process whose shard of a set was empty."""
        m = self.metrics
        empty = torch.zeros(0, device=m["general_nll"].nll.device)
        if m["success_rate"].update_count == 0:
            m["success_rate"].update(empty)
            m["scores"].update(empty.long(), empty)
        for name in ("general_nll", "targeted_nll"):
            if m[name].update_count == 0:
                m[name].update(empty, empty.long())
        if m["hard_negative_nll"].update_count == 0:
            m["hard_negative_nll"].update(empty)
            m["hard_negative_values"].update(empty.long(), empty)
        for name in PRACTITIONER_NAMES:
            if m[name].update_count == 0:
                m[name].update(empty)

    def summary(self, reset: bool = True) -> dict:
        """Computed metrics (synchronised across processes) and per-example scores; resets the metrics.

        Every process computes every metric in the same order (each compute is a collective under DDP), also a
        process whose shard of a set was empty; a metric is None when no process saw any example of its set.

        Besides the paper's metrics (``METRIC_NAMES``) it holds ``reliability`` (the success rate on the canonical
        examples, when the ``canonical`` role was evaluated) with ``reliability_mean_score``, the evaluation set's
        ``generalization_mean_score``, and ``per_example_hard_negatives`` (``{"index", "value"}`` per hard negative,
        the value of ``hard_negative_nll``), from which ``editing.evaluation.locality`` measures the preserved rate.
        """
        m = self.metrics
        self._update_unseen_with_nothing()
        # sizes, then the non-finite values each metric saw (scores; general, targeted, hard-negative NLLs)
        sizes = torch.stack([m["success_rate"].total, m["general_nll"].tokens, m["targeted_nll"].tokens,
                             m["hard_negative_nll"].count, *(m[name].nonfinite for name in METRIC_NAMES)]).clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sizes)
        summary: dict = {}
        for name, size in zip(METRIC_NAMES, sizes.tolist()[:4], strict=True):
            value = float(m[name].compute())
            summary[name] = value if size > 0 else None
        index, score = (t.reshape(-1) for t in m["scores"].compute())
        nonfinite = dict(zip(("scores", *METRIC_NAMES[1:]), (int(n) for n in sizes.tolist()[4:]), strict=True))
        summary["counts"] = {
            "evaluation": int(sizes[0]),
            "evaluation_failed": int(failed(score, self.task.threshold).sum()),
            "general_tokens": int(sizes[1]),
            "targeted_tokens": int(sizes[2]),
            "hard_negatives": int(sizes[3]),
            **{f"nonfinite_{name}": n for name, n in nonfinite.items()},
        }
        summary["per_example"] = [
            {"index": int(i), "score": s, "failed": bool(f)}
            for i, s, f in zip(index.tolist(), score.tolist(), failed(score, self.task.threshold).tolist(),
                               strict=True)
        ]
        # the practitioner's metrics, after the paper's (the same order on every process)
        extra = torch.stack([m["reliability"].total, m["reliability"].failed]).clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(extra)
        for name, size in zip(PRACTITIONER_NAMES, (extra[0], extra[0], sizes[0]), strict=True):
            value = float(m[name].compute())
            summary[name] = value if int(size) > 0 else None
        if int(extra[0]) > 0:
            summary["counts"]["canonical"] = int(extra[0])
            summary["counts"]["canonical_failed"] = int(extra[1])
        index, value = (t.reshape(-1) for t in m["hard_negative_values"].compute())
        summary["per_example_hard_negatives"] = [{"index": int(i), "value": v}
                                                 for i, v in zip(index.tolist(), value.tolist(), strict=True)]
        if any(nonfinite.values()) and _rank() == 0:
            seen = ", ".join(f"{n} {name}" for name, n in nonfinite.items() if n)
            log.warning("evaluation on %s saw NaN or infinite values (%s): non-finite scores count as failures, and a "
                        "non-finite general NLL is never inside a ball", self.task.name, seen)
        if reset:
            for metric in m.values():
                metric.reset()
        return summary

    def run(self, model: nn.Module, datamodule, roles: list[str] | None = None, progress: bool = False,
            scorer: TokenScorer | None = None, summarize: bool = True) -> dict | None:
        """Score ``model`` on ``datamodule``'s evaluation sets in one process (no Trainer) and sum up.

        Args:
            model: the model under evaluation (put in eval mode for the run, then back).
            datamodule: a ``TaskDataModule`` of this evaluator's task, attached to the model's tokenizer.
            roles: which evaluation roles to run (default: all the task has; ``canonical`` scores the canonical
                examples themselves, for ``reliability``).
            progress: show a progress bar per role.
            scorer: scores each batch's tokens in place of a forward pass of the whole model (an evaluation cache's
                scorer); each batch then carries ``position``, ``"<role>/<batch number>"``, to key its cache entry.
            summarize: return the summary (and reset the metrics); False leaves the metrics filled (``states``).

        Returns:
            The evaluation summary (see ``summary``), or None when not ``summarize``.
        """
        device = next(model.parameters()).device
        self.to(device)
        lockstep = sharded(model)
        was_training = model.training
        model.eval()
        self.scorer = scorer
        try:
            with full_precision(), evaluation_products(device) as mode, packed_linears(model, mode == PACKED):
                for role in roles or datamodule.eval_roles():
                    loader = datamodule.eval_dataloader(role)
                    # a sharded model's forward passes gather weights from every process: all run as many
                    most = _most_batches(len(loader), device) if lockstep else 0
                    if progress:
                        loader = tqdm(loader, desc=f"{datamodule.task.name}/{role}", leave=False, file=sys.stderr)
                    batches = 0
                    for number, batch in enumerate(loader):
                        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                        batch["position"] = f"{role}/{number}"
                        self.update(model, batch)
                        batches += 1
                        if lockstep and batch["input_ids"].numel() == 0:  # an empty shard: nothing to score
                            _idle_forward(model, device)
                    for _ in range(most - batches):
                        _idle_forward(model, device)
        finally:
            self.scorer = None
            model.train(was_training)
        return self.summary() if summarize else None

    def states(self) -> dict[str, dict[str, torch.Tensor]]:
        """The metrics' states summed over processes (what ``summary`` computes from), as CPU tensors: per metric,
        per state (list states concatenated). ``load_states`` puts them back."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for name, metric in self.metrics.items():
            with metric.sync_context(should_sync=distributed, distributed_available=lambda: distributed):
                out[name] = {k: (torch.cat(v) if v else torch.zeros(0)) if isinstance(v, list) else v
                             for k, v in metric.metric_state.items()}
                out[name] = {k: v.detach().to("cpu", copy=True) for k, v in out[name].items()}
        return out

    def load_states(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Fill the metrics with ``states`` (from ``states``) as if this process had scored every batch; under DDP
        call it on one process only (the others keep empty metrics, and ``summary`` sums over processes)."""
        for name, metric in self.metrics.items():
            device = metric.device
            for key, default in metric._defaults.items():
                value = states[name][key].to(device)
                if isinstance(default, list):  # a list state was saved concatenated
                    value = [value] if value.numel() else []
                setattr(metric, key, value)
            metric._update_count = 1
            metric._computed = None


def evaluate(subject: Evaluable, datamodule, roles: list[str] | None = None, progress: bool = False) -> dict:
    """Evaluate ``subject``'s model on ``datamodule``'s evaluation sets without a Trainer (one process).

    Args:
        subject: the model under evaluation with its tokenizer (an ``EditingModule``, a ``LoadedModel``, ...).
        datamodule: a ``TaskDataModule`` (attached to the subject's tokenizer if it is not yet).
        roles: which evaluation roles to run (default: all the task has).
        progress: show a progress bar per role.

    Returns:
        The evaluation summary (see ``Evaluator.summary``).
    """
    if datamodule.tokenizer is None:
        datamodule.attach(subject.tokenizer, subject.max_length)
    return Evaluator(datamodule.task).run(subject.model, datamodule, roles, progress)


def sharded(model: nn.Module) -> bool:
    """Whether ``model``'s weights are sharded over processes (FSDP2: DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    return isinstance(next(model.parameters()), DTensor)


def _most_batches(batches: int, device: torch.device) -> int:
    """The largest number of batches any process has (before any of them runs a forward pass: collectives pair up
    in the order they are called)."""
    most = torch.tensor([batches], device=device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most)


@torch.no_grad()
def _idle_forward(model: nn.Module, device: torch.device) -> None:
    """A forward pass on one token whose result is dropped: a sharded model's process with fewer (or empty) batches
    of a role takes part in the others' weight gathers, so that none waits for a gather that never comes."""
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    model(input_ids=token, attention_mask=torch.ones_like(token), use_cache=False)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0

"""What a run tells its user on the console: one line per epoch, a warning when an epoch holds too few optimizer
steps, and the quieting of dependency messages that mean nothing to a user.

The lines are built here (plain functions of the records) and printed by the callers: the DegradationBudget callback
prints ``epoch_line`` for epoch 0 and after every epoch, and ``small_data_warning`` when a fit starts;
``quiet_dependencies`` is called by ``editing.cli.main`` and the Python API before anything heavy is imported.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from editing.core.types import Metric
from editing.rules.budget import Ball, degradation, key_label, success_change_pp

MIN_STEPS_PER_EPOCH = 5
"""Below this many optimizer steps per epoch a fit warns at its start: with the paper's cosine schedule and a few
epochs, so few steps barely move an edit (issue 14: 12 examples with accumulation 5 gave 2 steps per epoch)."""

# Messages of dependencies that say nothing about the user's run (matched at the start of the message)
NOISY_WARNINGS: tuple[str, ...] = (
    # peft reads transformers' deprecated property while wrapping a model
    r"`is_gradient_checkpointing` is deprecated",
    # Lightning's own use of a deprecated torch pytree check
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # the fit claims its run folder (run.lock) before the CSV logger opens it; unfinished runs are refused by the
    # claim, so the logger's warning about a non-empty folder is always about our own lock file
    r"Experiment logs directory .* exists and is not empty",
    # the frozen base model is kept in eval mode on purpose (no dropout in p or p0); only the deltas train
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # a few canonical examples make fewer batches than the step logging interval; the per-epoch line shows the train
    # loss (logged per epoch), so nothing the user needs is missing
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)
NOISY_INFO: tuple[str, ...] = ("💡 Tip:", "\nDetected KeyboardInterrupt")
"""Lightning's advertisements (litlogger, litmodels), printed at info level on every fit, and its notice of a
Ctrl-C (the command prints what the interrupted run kept and how to resume it, ``editing.core.interruption``)."""


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: Iterable[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


_QUIET = False


def quiet_dependencies() -> None:
    """Silence the dependency warnings and tips listed in ``NOISY_WARNINGS`` and ``NOISY_INFO`` (once per process).

    Only those exact messages are dropped; every other warning still shows.
    """
    global _QUIET
    if _QUIET:
        return
    _QUIET = True
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    drop = _DropMessages(NOISY_INFO)
    # rank_zero_info logs on one of these loggers (the last of the two modules imported sets it); a logger's filter
    # sees only the records logged on it directly, which these are
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(drop)


def _number(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    value = float(value)
    return format(value, spec) if math.isfinite(value) else str(value)


def _rate(record: Mapping[str, Any], rate: str, score: str, change: str | None = None) -> str:
    """``0.375 (+25.0 pp; score 3.4)``: a success rate, its change from p0 when given, the mean score when known."""
    notes = [change] if change else []
    if record.get(score) is not None:
        notes.append(f"score {_number(record[score], '.4g')}")
    return _number(record.get(rate), ".3f") + (f" ({'; '.join(notes)})" if notes else "")


def epoch_line(record: Mapping[str, Any], initial: Mapping[str, Any], balls: Iterable[Ball],
               max_epochs: int | None = None, train_loss: float | None = None) -> str:
    """The console line of one evaluated epoch: what a practitioner reads (README, "What the numbers mean").

    Args:
        record: the epoch's record (the layout of ``results.json``'s epochs: ``epoch``, the metrics, ``degradation``).
        initial: epoch 0's record (p0).
        balls: the run's balls.
        max_epochs: the run's number of epochs, shown as ``epoch 3/10`` (None or negative: unknown).
        train_loss: the mean task loss of the epoch's training steps (None for epoch 0).

    Returns:
        E.g. ``epoch 2/5  train loss 2.315  reliability 0.500 (score 1.2)  generalization 0.375 (+25.0 pp; score
        3.4)  locality 0.875  degradation +4.12e-04  inside 1e-3; outside 1e-4, 1e-5`` (scores: the mean scores of
        the canonical and the evaluation examples); epoch 0 shows p0's general NLL instead of the degradation and
        the balls. A metric the record lacks is left out (reliability and locality in records of older runs;
        locality without hard negatives).
    """
    epoch = int(record["epoch"])
    of = f"/{max_epochs}" if max_epochs is not None and max_epochs >= 0 else ""
    parts = ["epoch 0 (before the edit)" if epoch == 0 else f"epoch {epoch}{of}"]
    if train_loss is not None:
        parts.append(f"train loss {_number(train_loss, '.4g')}")
    if record.get(Metric.RELIABILITY) is not None:
        parts.append("reliability " + _rate(record, Metric.RELIABILITY, Metric.RELIABILITY_MEAN_SCORE))
    success, before = record.get(Metric.SUCCESS_RATE), initial.get(Metric.SUCCESS_RATE)
    change = (f"{success_change_pp(before, success):+.1f} pp" if epoch > 0 and success is not None
              and before is not None else None)
    parts.append("generalization " + _rate(record, Metric.SUCCESS_RATE, Metric.GENERALIZATION_MEAN_SCORE, change))
    if record.get(Metric.LOCALITY) is not None:
        parts.append(f"locality {_number(record[Metric.LOCALITY], '.3f')}")
    nll, nll0 = record.get(Metric.GENERAL_NLL), initial.get(Metric.GENERAL_NLL)
    if epoch == 0 or nll is None or nll0 is None:
        parts.append(f"general NLL {_number(nll, '.5f')}")
    else:
        parts.append(f"degradation {_number(degradation(float(nll), float(nll0)), '+.2e')}")
        sample = record.get("general_sample")
        if isinstance(sample, Mapping) and sample.get("texts", 0) < sample.get("total", 0):
            # measured on a sample of G (--budget.general_sample): the interval the ball decisions read
            parts.append(f"[{sample['low']:+.2e}, {sample['high']:+.2e}] {sample['level']:.0%} CI on "
                         f"{sample['texts']}/{sample['total']} texts of G")
        elif isinstance(sample, Mapping):  # the sample grew to all of G: the exact degradation
            parts.append(f"(exact: all {sample.get('total')} texts of G)")
        inside = [key_label(b.key) for b in balls if b.inside(nll, nll0)]
        outside = [key_label(b.key) for b in balls if not b.inside(nll, nll0)]
        where = []
        if inside:
            where.append("inside " + ", ".join(inside))
        if outside:
            where.append("outside " + ", ".join(outside))
        parts.append("; ".join(where))
    return "  ".join(parts)


def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches`` training batches with gradient accumulation ``accumulate`` (a last
    partial accumulation still steps, as Lightning does)."""
    return math.ceil(batches / max(1, accumulate)) if batches > 0 else 0


def small_data_warning(examples: int, batch_size: int, batches: int, accumulate: int, max_epochs: int | None,
                       minimum: int = MIN_STEPS_PER_EPOCH) -> str | None:
    """A warning when an epoch holds fewer than ``minimum`` optimizer steps, saying what to change; None otherwise.

    Args:
        examples: canonical examples.
        batch_size: examples per training batch.
        batches: training batches per epoch (after any ``limit_train_batches``).
        accumulate: gradient accumulation (batches per optimizer step).
        max_epochs: the run's epochs (None or negative: unlimited).
        minimum: the fewest steps per epoch that pass without a warning.
    """
    steps = optimizer_steps_per_epoch(batches, accumulate)
    if steps >= minimum:
        return None
    fixes = []
    if accumulate > 1:
        better = optimizer_steps_per_epoch(batches, 1)
        fixes.append(f"lower --trainer.accumulate_grad_batches (1 gives {better} step(s) per epoch)")
    if batch_size > 1:
        fixes.append(f"lower --data.batch_size (now {batch_size})")
    epochs = f" (now {max_epochs})" if max_epochs is not None and max_epochs >= 0 else ""
    fixes.append(f"raise --trainer.max_epochs{epochs} so the run takes more steps in all")
    return (f"warning: an epoch holds only {steps} optimizer step(s) ({examples} canonical example(s), batch size "
            f"{batch_size}, {batches} batch(es) per epoch, gradient accumulation {accumulate}): too few for the edit "
            f"to move much. To fix: {'; '.join(fixes)}.")


__all__ = ["MIN_STEPS_PER_EPOCH", "epoch_line", "optimizer_steps_per_epoch",
           "quiet_dependencies", "small_data_warning"]

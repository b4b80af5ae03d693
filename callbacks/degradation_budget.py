"""The degradation budget (SPEC section 6): evaluate p0 and every epoch, keep per ball the last epoch inside it, and
write the run's results and edits. By default every epoch up to ``max_epochs`` is trained (the paper's rule);
stopping early is an option (``patience``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

from editing.core.errors import ConfigError
from editing.core.files import save_atomically, write_json
from editing.core.interruption import SOFT_STOP, soft_stop_requested
from editing.core.types import MethodName, Metric, RunStatus
from editing.evaluation.caching import CacheSettings, evaluate_epoch
from editing.evaluation.locality import hard_negative_values, preserved_rate
from editing.evaluation.sampled_general import SampledGeneral
from editing.rules.budget import (
    DEFAULT_BALLS,
    Ball,
    ball_key,
    choose_epochs,
    edit_folder_name,
    epoch_objective,
    parse_balls,
    parse_epoch_rule,
    parse_max_epoch,
)
from editing.rules.sampling import AUTO, DEFAULT_LEVEL, parse_general_sample, parse_level
from editing.runs.console import epoch_line, small_data_warning
from editing.runs.records import RESULTS_FILE, BallRecord, EpochRecord, RunRecord, StoppedEarly, TaskRef, ball_records
from editing.runs.run_folder import PARTIAL_DIR, Claim, ResultsWriteError, check_folder, claim_folder
from editing.runs.tables import balls_table

OVERWRITE_FLAG = "--budget.overwrite true"

# re-exported: the ball rule lives in editing.rules.budget
__all__ = ["DEFAULT_BALLS", "Ball", "DegradationBudget", "ball_key", "choose_epochs"]

GENERAL_NLL = Metric.GENERAL_NLL
GENERAL_ROLE = "general"
LOGGED = tuple(Metric)  # logged as val/<metric>, epoch 0 included
ALIASES = {Metric.GENERALIZATION: Metric.SUCCESS_RATE}  # logged under both names, stored once


def logged_metrics(record: dict) -> dict[str, float]:
    """The ``val/<metric>`` values of one epoch's record (those measured), aliases included."""
    metrics = {f"val/{k}": float(v) for k, v in record.items() if k in LOGGED and v is not None}
    for alias, name in ALIASES.items():
        if record.get(name.value) is not None:
            metrics[f"val/{alias.value}"] = float(record[name.value])
    return metrics


class DegradationBudget(L.Callback):
    """Keeps an edit inside the degradation balls.

    Evaluates p0 before training (epoch 0) and the edited model after every epoch on the DataModule's evaluation
    sets and its canonical examples; logs ``val/success_rate``, ``val/general_nll``, ``val/degradation``,
    ``val/targeted_nll`` and ``val/hard_negative_nll``, and what a practitioner reads: ``val/reliability`` (success
    on the canonical examples) and ``val/reliability_mean_score``, ``val/generalization`` (= success rate) and
    ``val/generalization_mean_score``, ``val/locality`` (the hard negatives preserved relative to p0,
    ``editing.evaluation.locality``); keeps, per ball, the last epoch inside it (or the best: ``epoch_rule``) and
    that epoch's deltas; at the end writes ``results.json`` and each ball's edit into the run folder. Its state is
    saved in checkpoints, so a resumed run continues it.

    Args:
        balls: the eps values of the balls (each finite, 0 < eps < 1, listed once; default 1e-3, 1e-4, 1e-5).
        patience: None (the default, the paper's rule): train every epoch up to ``max_epochs``. A number N: stop once
            the general NLL has been outside the largest ball for N epochs in a row. Stopping early saves time but
            can change the result: an epoch after the stop whose general NLL would have come back inside a ball is
            never seen, so the reported epoch can be earlier (and the success change smaller) than the paper's rule
            gives. A run that stops early records when and why in ``results.json`` (``stopped_early``).
        output_dir: run folder (default: the trainer's log folder).
        overwrite: replace the results of a finished run in ``output_dir``.
        save_edits: write each ball's edit (LoRA adapter, changed tensors, ...) at the end.
        max_epoch: per ball key, do not choose an epoch after this one (test runs use validation's choice).
        p0_cache: read p0's evaluation (epoch 0) from the cache that fits on the same model and data share, and fill
            it when absent (``editing.evaluation.caching``); the numbers are the same either way.
        incremental: evaluate each epoch computing only what the edit can change (the frozen blocks below a LoRA
            block or MEMIT's layers, the positions a sense edit reaches); equal to a full evaluation to fp32
            rounding. ``$EDITING_EVAL_CACHES=off`` turns this and ``p0_cache`` off.
        cache_memory_mb: memory (MiB) the incremental evaluation may keep per process; what does not fit goes to
            disk (``$EDITING_EVAL_CACHE_DIR``, default ``<cache>/evaluation``), where later fits find it too.
        partial: after every evaluated epoch whose edit a ball now reports, write it and the record so far into
            ``<run folder>/partial/`` (``edits/ball_<eps>``, ``results.json``), so that a fit killed later keeps
            its best edit (``editing auto``'s trials under a deadline). The run folder itself does not look
            finished; the finished results replace the partial record.
        general_sample: how much of the general set G the degradation is measured on (issue 36 item 6): ``all``
            (every text, every epoch: the paper's protocol, which sweeps and test runs pass), a number N (a seeded
            sample of N texts, doubled until the degradation's interval clears every ball's edge or G is used up;
            ``editing.rules.sampling``), or ``auto`` (the default: a first sample of 64 texts for a task of one's
            own, ``all`` for a built-in task). A sampled epoch's ``general_nll`` is p0's NLL on the first sample
            times the estimated ratio, so the ball rule reads the interval's decision; its ``general_sample`` holds
            the sample size and interval. Under ``--base_edit`` all of G is used.
        interval_level: the confidence level of that interval (a t-interval of the ratio estimator).
        epoch_rule: which epoch inside a ball it reports (and whose edit it keeps): ``last`` (the default, SPEC
            section 6) or ``best``, the one with the highest reliability + success rate on the evaluation set, the
            later on a tie (``editing auto``'s trials, whose evaluation set is the search's selection prompts: an
            edit that generalizes best early and then overfits its literal prompts keeps its early epoch).
        best_patience: None (the default): train every epoch. A number N: stop once an edited epoch is inside the
            largest ball and reliability + success rate there has not risen above its best for N epochs (an epoch
            outside the ball counts as not risen); with ``epoch_rule="best"`` the stop then loses only epochs that
            would have had to beat that best after N epochs without doing so.
        stop_at_cap: with ``max_epoch`` capping every ball, stop after the largest cap: no later epoch can be
            reported (``editing auto``'s final fit; test runs keep training every epoch, whose records list them).

    A fit asked to stop softly (``editing.core.interruption.SOFT_STOP``, SIGUSR1: ``editing auto``'s time share of
    a trial ended) stops after the epoch it is in has been evaluated, and writes its results as usual; the record
    says so in ``stopped_early``.
    """

    def __init__(self, balls: list[float] | None = None, patience: int | None = None, output_dir: str | None = None,
                 overwrite: bool = False, save_edits: bool = True, max_epoch: dict[str, int] | None = None,
                 p0_cache: bool = True, incremental: bool = True, cache_memory_mb: float = 1024.0,
                 partial: bool = False, general_sample: str | int = AUTO,
                 interval_level: float = DEFAULT_LEVEL, epoch_rule: str = "last", best_patience: int | None = None,
                 stop_at_cap: bool = False) -> None:
        self.balls: tuple[Ball, ...] = parse_balls(balls, "--budget.balls")
        self.epoch_rule = parse_epoch_rule(epoch_rule)
        if best_patience is not None and (isinstance(best_patience, bool) or not isinstance(best_patience, int)
                                          or best_patience < 1):
            raise ConfigError(f"--budget.best_patience={best_patience!r}: give a number of epochs >= 1, or null to "
                              "train every epoch")
        self.best_patience = best_patience
        self.stop_at_cap = bool(stop_at_cap)
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"--budget.patience={patience!r}: give a number of epochs >= 1, or null to train every "
                              "epoch (the paper's rule)")
        self.patience = patience
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.save_edits = save_edits
        self.max_epoch = parse_max_epoch(max_epoch, self.balls, "--budget.max_epoch")
        if not cache_memory_mb >= 0:
            raise ConfigError(f"--budget.cache_memory_mb={cache_memory_mb!r}: give a size in MiB >= 0 (0 keeps every "
                              "incremental-evaluation entry on disk)")
        self.caches = CacheSettings(p0=p0_cache, incremental=incremental, memory_mb=cache_memory_mb)
        self.partial = partial
        parse_general_sample(general_sample)  # checked here, resolved when the task is known (on_fit_start)
        self.general_sample = general_sample
        self.interval_level = parse_level(interval_level)
        self.sampled: SampledGeneral | None = None
        self._sampled_state: dict | None = None  # p0's per-text sums restored from a checkpoint
        self.history: list[dict] = []
        self.ball_states: dict[str, dict[str, torch.Tensor]] = {}
        self.outside = 0
        self.diverged_epoch: int | None = None
        self.stopped_early: dict | None = None
        self.p0_hard_negatives: dict[int, float] | None = None  # p0's value per hard negative, for locality
        # a fit on top of an earlier edit (--base_edit): the original base model's evaluation, which the balls, the
        # degradation and the locality are measured against (epoch 0 is then the model the fit started from)
        self.original: dict | None = None
        self.resolved_config: dict | None = None
        self.results_path: Path | None = None
        self._catching_up = False
        self._restored = False
        self.claims: list[Claim] = []
        self._losses: list[torch.Tensor] = []  # the task losses of this epoch's training steps, for its line

    # state in checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history": self.history, "ball_states": self.ball_states, "outside": self.outside,
                "diverged_epoch": self.diverged_epoch, "stopped_early": self.stopped_early,
                "p0_hard_negatives": self.p0_hard_negatives, "original": self.original,
                "sampled_general": None if self.sampled is None else self.sampled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._restored = True  # a resumed run: epoch 0's row is in the log already
        self.history = list(state["history"])
        self.ball_states = dict(state["ball_states"])
        self.outside = int(state["outside"])
        self.diverged_epoch = state.get("diverged_epoch")
        self.stopped_early = state.get("stopped_early")
        self.p0_hard_negatives = state.get("p0_hard_negatives")  # None in checkpoints older than locality
        self.original = state.get("original")
        self._sampled_state = state.get("sampled_general")

    # helpers ---------------------------------------------------------------------------------------------
    def run_dir(self, trainer: L.Trainer) -> Path:
        """Where results and edits go."""
        return Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)

    def initial_nll(self) -> float | None:
        """The general NLL the balls are around: p0's (epoch 0's; the original base model's under a base edit)."""
        if self.original is not None:
            return self.original[GENERAL_NLL]
        return self.history[0][GENERAL_NLL] if self.history else None

    def _evaluate(self, trainer: L.Trainer, module, epoch: int, subject=None) -> dict:
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        dm = trainer.datamodule
        roles = dm.eval_roles(canonical=True)
        if self.sampled is not None and subject is None:
            roles = [r for r in roles if r != GENERAL_ROLE]
        summary = evaluate_epoch(subject or module, dm, epoch, self.caches, roles=roles,
                                 progress=show, announce=trainer.is_global_zero)
        if self.sampled is not None and subject is None:
            summary = self._sampled_summary(module, epoch, summary)
        values = hard_negative_values(summary["per_example_hard_negatives"])
        if epoch == 0 and (subject is not None or self.original is None):
            self.p0_hard_negatives = values
        summary[Metric.LOCALITY.value] = (None if self.p0_hard_negatives is None
                                          else preserved_rate(self.p0_hard_negatives, values))
        # the history holds plain dicts (the layout of results.json's epochs): checkpoints store it
        record = EpochRecord.of(epoch, summary, self.initial_nll()).to_dict()
        if "general_sample" in summary:
            record["general_sample"] = summary["general_sample"]
            record[Metric.DEGRADATION.value] = summary["general_sample"]["degradation"]
        return record

    def _start_sampling(self, trainer: L.Trainer, pl_module) -> None:
        """Resolve ``general_sample`` for this fit's task and set up the sampled measure of G."""
        dm = trainer.datamodule
        setting = self.general_sample
        if setting == AUTO:
            setting = "all" if dm.task.builtin else AUTO
        first = parse_general_sample(setting)
        if first is None or getattr(pl_module, "base_edit", None) is not None or trainer.world_size > 1:
            return  # all of G: the paper's numbers (a base edit's balls and DDP's shards keep the full evaluation)
        if dm.tokenizer is None:
            dm.attach(pl_module.tokenizer, pl_module.max_length)
        sampled = SampledGeneral(dm, first, seed=dm.seed, level=self.interval_level)
        if sampled.total <= first:
            return  # the first sample would be all of G: the full evaluation gives the same decision, exactly
        self.sampled = sampled
        if self._sampled_state:
            self.sampled.load_state_dict(self._sampled_state)
        self._say(trainer, f"the degradation is measured on a sample of G (--budget.general_sample {setting}: "
                           f"{self.sampled.sizes[0]} of {self.sampled.total} texts first, grown until the "
                           f"{self.interval_level:.0%} interval clears each ball's edge; 'all' for every text)")

    def _sampled_summary(self, module, epoch: int, summary: dict) -> dict:
        """The epoch's summary with the general NLL from the sample of G (see ``general_sample``): p0's NLL on the
        first sample at epoch 0, then that times the estimated ratio, with the sample and interval."""
        sampled = self.sampled
        if epoch == 0:
            n = sampled.sizes[0]
            summary[GENERAL_NLL.value] = sampled.p0_nll(module.reference)
            summary["general_sample"] = {"degradation": 0.0, "low": 0.0, "high": 0.0, "level": sampled.level,
                                         "texts": n, "total": sampled.total, "interval": "p0 (the first sample)"}
        else:
            interval = sampled.measure(module.model, module.reference, [b.eps for b in self.balls])
            n = interval.texts
            summary[GENERAL_NLL.value] = self.initial_nll() * (1.0 + interval.degradation)
            summary["general_sample"] = interval.to_dict()
        summary["counts"]["general_tokens"] = sum(sampled.tokens[i] for i in sampled.order[:n])
        return summary

    def _evaluate_original(self, trainer: L.Trainer, module) -> dict:
        """The original base model's evaluation, for a fit on top of a base edit (its ``reference()``)."""
        with module.reference() as model:
            record = self._evaluate(trainer, module, 0, subject=Original(module, model))
        self._say(trainer, f"original base model (p0 of the balls; the fit starts from --base_edit "
                           f"{module.base_edit.folder}): general NLL {record[GENERAL_NLL]:.6g}, generalization "
                           f"{record[Metric.SUCCESS_RATE.value]:.3f}")
        return record

    def _log(self, module, record: dict) -> None:
        # The epoch's row goes to the loggers at once rather than through module.log, which writes it only after
        # every callback's epoch-end hook: a checkpoint written at the epoch's end (which a resumed run does not
        # evaluate again) then comes after its row, and an epoch evaluated late (_catch_up) gets the row its end
        # would have had.
        trainer = module.trainer
        metrics = logged_metrics(record)
        # Lightning's step for an epoch's end row; a late evaluation runs before the restored count is advanced
        step = trainer.fit_loop.epoch_loop._batches_that_stepped - (0 if self._catching_up else 1)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
                logger.save()
        if not self._catching_up:
            for name, value in metrics.items():  # for monitoring callbacks and the progress bar
                module.log(name, value, rank_zero_only=True, logger=False)

    # the console -------------------------------------------------------------------------------------------
    @staticmethod
    def _say(trainer: L.Trainer, text: str) -> None:
        if trainer.is_global_zero:
            print(text, flush=True)

    def _line(self, trainer: L.Trainer, record: dict, train_loss: float | None = None) -> str:
        # the balls around the original model's general NLL under a base edit (initial_nll)
        initial = {**self.history[0], GENERAL_NLL: self.initial_nll()}
        return epoch_line(record, initial, self.balls, trainer.max_epochs, train_loss)

    def _epoch_loss(self) -> float | None:
        losses, self._losses = self._losses, []
        return float(torch.stack(losses).float().mean()) if losses else None

    def _warn_small_epochs(self, trainer: L.Trainer) -> None:
        """Warn when an epoch holds fewer than a handful of optimizer steps, and say what to change (issue 14: 12
        examples with gradient accumulation 5 gave 2 steps an epoch, and the edit did not move)."""
        if not trainer.is_global_zero or not trainer.optimizers or self._restored:
            return  # MEMIT takes no optimizer steps; a resumed run warned when it started
        dm = trainer.datamodule
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or dm is None:
            return  # an iterable without a length: nothing to count
        examples = len(dm.load("canonical").examples) if hasattr(dm, "load") else batches
        message = small_data_warning(examples, getattr(dm, "batch_size", 1), batches,
                                     int(trainer.accumulate_grad_batches), trainer.max_epochs)
        if message:
            print(message, file=sys.stderr, flush=True)

    def _update_balls(self, module, record: dict) -> list[str]:
        # Keep, per ball, the deltas of the epoch the ball reports (choose_epochs, with the test rule's caps): this
        # epoch, once it is in the history, when it is that choice. Returns the balls whose edit changed.
        chosen = choose_epochs(self.history, self.balls, self.max_epoch, self.initial_nll(), self.epoch_rule)
        state = None
        changed = []
        for ball in self.balls:
            if chosen[ball.key] == record["epoch"]:
                state = state if state is not None else module.delta_state()
                self.ball_states[ball.key] = state
                changed.append(ball.key)
        return changed

    def _write_partial(self, trainer: L.Trainer, pl_module, changed: list[str]) -> None:
        """The record so far and the edits of the balls that now report this epoch, into ``partial/`` (atomically:
        a fit killed while writing leaves the previous edit and record whole)."""
        if not trainer.is_global_zero:
            return
        folder = self.run_dir(trainer) / PARTIAL_DIR
        record = self.record(trainer, pl_module)
        try:
            self._write_results(folder, record, pl_module, only=set(changed), keep=folder / "edits")
        except OSError as err:  # the partial record is a safeguard: the fit goes on without it
            print(f"warning: could not write the partial record into {folder}: {err.strerror or err}",
                  file=sys.stderr, flush=True)

    def _stop_softly(self, trainer: L.Trainer, epoch: int) -> None:
        trainer.should_stop = True
        last = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch
        if last:
            return  # the fit ends here anyway: nothing was cut short
        self.stopped_early = {
            "epoch": epoch,
            "reason": f"the fit's time share ended (asked to stop by {SOFT_STOP.name}, editing auto's budget): "
                      f"epochs {epoch + 1}..{trainer.max_epochs} were not trained",
        }
        self._say(trainer, f"stopped after epoch {epoch}: {self.stopped_early['reason']}")

    # hooks -----------------------------------------------------------------------------------------------
    def claim_run_folder(self, trainer: L.Trainer, resuming: bool, also: tuple[Path, ...] = (),
                         restarting: bool = False) -> None:
        """Check and claim the run folder and the folders ``also`` (see ``editing.runs.run_folder``, which explains
        ``resuming`` and ``restarting``) unless done already.

        The CLI calls this before the fit touches any file (with the logger's folder in ``also``), ``on_fit_start``
        for fits started otherwise. Every folder is checked before any is claimed, so a refused fit writes nothing.
        """
        if self.claims or not trainer.is_global_zero:
            return
        folders = list(dict.fromkeys(Path(os.path.abspath(f)) for f in (self.run_dir(trainer), *also)))
        for folder in folders:
            check_folder(folder, resuming, self.overwrite, OVERWRITE_FLAG, restarting)
        try:
            for folder in folders:
                self.claims.append(claim_folder(folder, resuming, self.overwrite, OVERWRITE_FLAG, restarting))
        except BaseException:
            self.release_run_folder()
            raise

    def release_run_folder(self) -> None:
        """Give up the claim on the run folder (the run ended, or failed)."""
        claims, self.claims = self.claims, []
        for claim in claims:
            claim.release()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.release_run_folder()

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.save_edits and getattr(pl_module, "sharded", False):
            raise ConfigError("the model is sharded over processes (FSDP), and saving its edits is not supported yet: "
                              "pass --budget.save_edits false (results.json and every epoch's numbers are still "
                              "written), or fit with DDP")
        # a resumed run continues its own results; anything else must not replace a finished run
        self.claim_run_folder(trainer, resuming=bool(trainer.ckpt_path))
        pl_module.reuse_base_numbers = self.caches.effective().p0
        self._start_sampling(trainer, pl_module)
        if self.history:  # resumed: epoch 0 and earlier epochs are in the restored state
            return
        if getattr(pl_module, "base_edit", None) is not None:
            self.original = self._evaluate_original(trainer, pl_module)
        record = self._evaluate(trainer, pl_module, 0)
        self.history.append(record)
        self.ball_states = {ball.key: pl_module.delta_state() for ball in self.balls}
        self._say(trainer, self._line(trainer, record))

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self._warn_small_epochs(trainer)
        self._catch_up(trainer, pl_module)
        if len(self.history) == 1 and not self._restored and trainer.logger is not None:
            # epoch 0 is logged once a logger is ready
            trainer.logger.log_metrics(logged_metrics(self.history[0]), step=0)

    def _catch_up(self, trainer: L.Trainer, pl_module) -> None:
        """Evaluate an epoch whose end a resumed run skipped.

        Lightning resumes a checkpoint written after an epoch's last batch (``every_n_train_steps``) in the next
        epoch without calling ``on_train_epoch_end``: that epoch would never be evaluated. The deltas restored are
        the ones its end would have seen, so it is evaluated here, as its end would have done.
        """
        finished = trainer.current_epoch  # epochs whose batches are all done
        if not self.history or self.history[-1]["epoch"] >= finished or self.diverged_epoch is not None:
            return
        if trainer.should_stop or self.history[-1]["epoch"] != finished - 1:
            return
        progress = trainer.fit_loop.epoch_progress.current
        progress.completed -= 1  # current_epoch: the epoch whose end this is, as in on_train_epoch_end
        self._catching_up = True
        try:
            self.on_train_epoch_end(trainer, pl_module)
        finally:
            progress.completed += 1
            self._catching_up = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        self._losses = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = getattr(pl_module, "last_task_loss", None)
        if loss is not None:
            self._losses.append(loss)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if pl_module.diverged:
            self.diverged_epoch = epoch
            trainer.should_stop = True
            self._say(trainer, f"stopped in epoch {epoch}: the training loss became NaN or infinite; the results keep "
                               f"epochs 0..{epoch - 1} (status: diverged). Lower --model.optimizer.lr and fit again")
            return
        record = self._evaluate(trainer, pl_module, epoch)
        self.history.append(record)
        self._log(pl_module, record)
        changed = self._update_balls(pl_module, record)
        self._say(trainer, self._line(trainer, record, self._epoch_loss()))
        if self.partial and not self._catching_up:
            self._write_partial(trainer, pl_module, changed)
        if soft_stop_requested() and not trainer.should_stop:
            self._stop_softly(trainer, epoch)
            return
        last = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= epoch
        reason = None if last else self._nothing_left_to_gain(epoch)
        if reason is not None:
            trainer.should_stop = True
            skipped = (f"epochs {epoch + 1}..{trainer.max_epochs} were not trained"
                       if trainer.max_epochs is not None and trainer.max_epochs > 0 else "no later epoch was trained")
            self.stopped_early = {"epoch": epoch, "reason": f"{reason}; {skipped}"}
            self._say(trainer, f"stopped early after epoch {epoch}: {self.stopped_early['reason']}")
            return
        largest = max(self.balls, key=lambda b: b.eps)
        if largest.inside(record[GENERAL_NLL], self.initial_nll()):
            self.outside = 0
            return
        self.outside += 1
        if self.patience is not None and self.outside >= self.patience and not last:
            trainer.should_stop = True
            skipped = (f"epochs {epoch + 1}..{trainer.max_epochs} were not trained"
                       if trainer.max_epochs is not None and trainer.max_epochs > 0
                       else "no later epoch was trained")
            self.stopped_early = {
                "epoch": epoch,
                "reason": f"general NLL outside the largest ball ({largest.key}) for {self.outside} epoch(s) in a row "
                          f"(--budget.patience {self.patience}); {skipped}, so a later epoch that comes back inside "
                          "a ball is never seen (null patience trains every epoch, the paper's rule)",
            }
            self._say(trainer, f"stopped early after epoch {epoch}: {self.stopped_early['reason']}")

    def _nothing_left_to_gain(self, epoch: int) -> str | None:
        """Why training past ``epoch`` cannot change what this fit reports, if it cannot (else None): every ball is
        capped at or before it (``stop_at_cap``), or the best epoch rule's objective inside the largest ball has not
        risen for ``best_patience`` epochs (``editing auto``'s trials)."""
        if self.stop_at_cap and self.max_epoch and set(self.max_epoch) == {b.key for b in self.balls} \
                and epoch >= max(self.max_epoch.values()):
            return (f"every ball's epoch is capped at or before epoch {epoch} (--budget.max_epoch with "
                    "--budget.stop_at_cap true), so no later epoch can be reported")
        if self.best_patience is None:
            return None
        largest = max(self.balls, key=lambda b: b.eps)
        edited = [r for r in self.history if r["epoch"] > 0 and largest.inside(r.get(GENERAL_NLL), self.initial_nll())]
        if not edited:
            return None
        top = max(epoch_objective(r) for r in edited)
        first = min(r["epoch"] for r in edited if epoch_objective(r) == top)
        if epoch - first < self.best_patience:
            return None
        return (f"reliability + success rate inside the largest ball ({largest.key}) has not risen above epoch "
                f"{first}'s {top:.3f} for {epoch - first} epoch(s) (--budget.best_patience {self.best_patience})")

    def summary(self) -> dict[str, BallRecord]:
        """Per ball: the chosen epoch, its metrics, and the change in success rate in percentage points."""
        return ball_records([EpochRecord.from_dict(e) for e in self.history], self.balls, self.max_epoch,
                            self.initial_nll(), self.epoch_rule)

    def record(self, trainer: L.Trainer, pl_module) -> RunRecord:
        """The run's record as it stands (``results.json`` without its edits)."""
        dm = trainer.datamodule
        stopped = None if self.stopped_early is None else StoppedEarly(**self.stopped_early)
        model = dict(pl_module.identity)
        if self.original is not None:  # what the balls were measured against
            model["base_edit"] = {**model.get("base_edit", {}), "original": self.original}
        return RunRecord(
            method=MethodName(pl_module.method).value, task=TaskRef.of(dm.task), split=dm.split,
            model=model, seed=dm.seed, config=self.resolved_config,
            hyperparameters=dict(pl_module.hparams),
            status=RunStatus.DIVERGED if self.diverged_epoch is not None else RunStatus.FINISHED,
            diverged_at_epoch=self.diverged_epoch, stopped_early=stopped,
            epochs=[EpochRecord.from_dict(e) for e in self.history], balls=self.summary(), edits={},
            data_files=dm.describe(),
        )

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        run_dir = self.run_dir(trainer)
        record = self.record(trainer, pl_module)
        try:
            self.results_path = self._write_results(run_dir, record, pl_module)
        except OSError as err:
            # disk full, folder gone or made read-only during training: what was computed is not lost
            rescue = self._rescue(record, pl_module)
            saved = f"the results and edits were saved in {rescue} instead" if rescue else \
                "nothing could be saved elsewhere either"
            raise ResultsWriteError(
                f"could not write the results into {run_dir}: {err.strerror or err}; {saved}. Free space or fix the "
                "folder, then copy them there (or resume with --ckpt_path last, which writes them again)"
            ) from None
        # the finished results hold everything the partial record did
        shutil.rmtree(run_dir / PARTIAL_DIR, ignore_errors=True)
        self.release_run_folder()
        print(balls_table(record))
        if self.stopped_early is not None:
            # the reason was printed when the run stopped; the summary only recalls that the table ends there
            epoch = self.stopped_early["epoch"]
            reason = self.stopped_early["reason"]
            why = ("its time share ended" if "time share" in reason else "--budget.best_patience"
                   if "best_patience" in reason else "--budget.stop_at_cap" if "stop_at_cap" in reason
                   else f"--budget.patience {self.patience}")
            print(f"(the run stopped early after epoch {epoch}: {why})")
        print(f"results: {self.results_path}")

    def _write_results(self, run_dir: Path, record: RunRecord, pl_module, only: set[str] | None = None,
                       keep: Path | None = None) -> Path:
        """``results.json`` and each ball's edit into ``run_dir``; ``only``: write just these balls' edits, and name
        those already in ``keep`` for the others (the partial record, whose unchanged edits stay as written)."""
        edits = {}
        if self.save_edits:
            current = pl_module.delta_state()
            try:
                for key, ball in record.balls.items():
                    state = self.ball_states.get(key)
                    if state is None or ball.epoch != self._state_epoch(key):
                        continue
                    if only is not None and (key not in only or ball.epoch == 0):  # epoch 0: the unedited model
                        if keep is not None and (keep / edit_folder_name(key)).is_dir():
                            edits[key] = str(keep / edit_folder_name(key))
                        continue
                    # the edit's folder appears complete or not at all (a resumed run writes it again)
                    folder = save_atomically(run_dir / "edits" / edit_folder_name(key),
                                             lambda tmp, state=state: pl_module.export_edit(tmp, state),
                                             folder=True, overwrite=True)
                    edits[key] = str(folder)
            finally:
                pl_module.load_delta_state(current)
        record.edits = edits
        return write_json(run_dir / RESULTS_FILE, record.to_dict(), overwrite=True)

    def _rescue(self, record: RunRecord, pl_module) -> Path | None:
        for root in (os.environ.get("EDITING_RESCUE_DIR"), tempfile.gettempdir(), Path.home()):
            if not root:
                continue
            try:
                folder = Path(tempfile.mkdtemp(prefix="editing-results-", dir=root))
                self._write_results(folder, record, pl_module)
                return folder
            except OSError:
                continue
        return None

    def _state_epoch(self, key: str) -> int:
        # The saved state of a ball is the one of the last epoch inside it up to the ball's max_epoch cap, which is
        # the epoch choose_epochs reports; an edit is exported only when the two agree.
        return choose_epochs(self.history, self.balls, self.max_epoch, self.initial_nll(), self.epoch_rule)[key]



class Original:
    """The original base model as an evaluation subject (``editing.evaluation.caching.evaluate_epoch``), for a fit on
    top of a base edit: the module's ``reference()`` model, whose epoch-0 numbers are the base model's (its p0
    cache applies), with a full evaluation (the method's shortcut describes its own edit, not this model).

    Args:
        module: the editing module.
        model: the model its ``reference()`` yielded.
    """

    p0_is_base = True

    def __init__(self, module, model) -> None:
        self.model = model
        self.identity = module.identity
        self.tokenizer = module.tokenizer
        self.max_length = module.max_length

    def evaluation_shortcut(self) -> None:
        return None

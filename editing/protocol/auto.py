"""``editing auto``: find an edit inside a ball within a budget of trials or minutes (issue 14 item 5).

Given a task (a built-in task, a task YAML, or a JSONL of canonical examples), one or several methods, a ball and a
budget, it searches the hyperparameters with the sweep's machinery (``editing.protocol.space``: the search spaces of
``lightning_configs/sweeps/<method>.yaml``, SPEC section 6; each trial one ``editing fit`` subprocess of
``lightning_configs/fit/<method>.yaml``) and returns the best edit inside the ball, its numbers and the configuration
that made it.

How it searches:

- **Validation.** A task with a validation pair (a built-in task, or a task YAML whose canonical and evaluation paths
  contain ``{split}``) is searched on its ``val`` pair and the final edit is fitted on its ``test`` pair. Otherwise,
  when the task has evaluation prompts of its own, a part of those prompts is held out (issue 36 item 4: per
  canonical example when each prompt has one example's suffix, else a seeded fraction; ``selected_prompts``): every
  fit trains on all canonical examples, the trials are scored on the held-out prompts and the final edit is
  reported on the others. Without evaluation prompts (or ``selection="examples"``: a task YAML without
  ``{split}``, or plain examples) a part of the canonical examples is held out (``holdout``, a
  seeded random choice): the trials train on the rest and are scored on the held-out examples as their evaluation
  set, and the final edit is fitted with the chosen configuration on all canonical examples and reported on the
  task's evaluation set (which the search never saw). The final fit reports, as ``editing test-runs`` does, the
  last epoch inside the ball among epochs 0..v, v the best trial's ball epoch (SPEC section 6). Plain examples without
  an evaluation set are scored on their own canonical file: that success rate is training-set success and is not
  reported as generalization.
- **Small-data defaults** (``SmallData``): an epoch should hold at least ``STEPS_PER_EPOCH`` optimizer steps, so the
  gradient accumulation is ``clamp(n // STEPS_PER_EPOCH, 1, 5)`` for ``n`` training examples (5 is the paper's);
  the epochs are ``clamp(ceil(TOTAL_STEPS / steps per epoch), MIN_EPOCHS, MAX_EPOCHS)``, so fewer examples mean
  more epochs. Methods that do not train by gradient (MEMIT: no ``trainer.accumulate_grad_batches`` in their fit
  config) keep their config's settings.
- **Objective.** A trial is scored by ``reliability + generalization`` (success rates on its own canonical
  examples and on its evaluation set: the selection prompts or held-out examples) at its best epoch inside the ball:
  the trials' fits report, and keep the edit of, the epoch inside the ball with the highest objective, the later on
  a tie (``--budget.epoch_rule best``; ``TRIAL_FIT_ARGS``), not only the last epoch inside it (SPEC section 6's rule,
  which the final fit keeps): an edit that generalizes best after a few epochs and then overfits its literal
  prompts keeps its early epoch; a trial stops ``TRIAL_PATIENCE`` epochs after its best (``--budget.best_patience``),
  and the final fit after its capped epoch v (``FINAL_FIT_ARGS``). Ties between trials go to the lower mean
  canonical score (progress before any example succeeds), then to the smaller degradation, then to the earlier
  trial. Hard negatives (locality) are reported, never used for selection (SPEC section 1).
- **Strong on the task, protective of general text, first.** The first exploring trial of each method takes the
  extreme quarter of each ``FIRST_STRATUM`` setting: the highest learning rate and rank (and MEMIT clamp), but also
  the highest KL weight and the widest LoRA block, so that the edit learns fast while the KL term holds general text
  in place (measured on invented facts, docs/results.md: KL weights 0.18 and 0.32 left the 1e-3 ball with the facts
  half learnt; KL weight 1.0 with a LoRA learning rate of 3e-3 over 90% of the layers learnt all 12 inside it). The
  other settings and the later exploring trials draw their strata in a seeded order.
- **Every epoch by default** (``patience`` None, the paper's rule): such an edit often leaves the ball for an epoch
  or two and comes back inside as the task loss reaches zero and the cosine schedule winds down, now with the
  examples learnt (measured on invented facts: outside at epoch 3 with reliability 0.42, inside at epochs 4, 5 and 6
  with 0.75, 0.92 and 1.0; a trial stopped after two epochs outside never shows it). ``patience`` N ends a fit after
  N epochs in a row outside the ball: cheaper trials that cannot see such a return.
- **Narrowing.** The first ``explore`` trials of each method are spread over its whole search space (one stratum of
  each range per trial). A trial with no edited epoch inside the ball (it overshot) is followed at once by a step
  back: a trial of the same method drawn from a window of an eighth of each range on the weaker side of it
  (``OVERSHOOT_LEVEL``), before any other method is explored (at most ``MAX_STEP_BACKS`` times per method): it
  showed that the method moves the examples, and a 30-minute budget has room for only a few trials. After the
  exploring trials, each trial uses the method of the best trial so far and draws every setting
  from a window around the best trial's value that halves with each such trial (a log10 range for
  ``log10_uniform``). The window is one-sided when the best trial says which way to go, a bisection of the edit's
  strength: when it ended inside the ball (its last epoch is inside it) and is not yet fully reliable, the edit
  was too weak and the windows of the ``STRONGER`` settings lie on the stronger side; when it left the ball in its
  first epoch (its ball epoch is 0: no edited epoch inside), it was too strong and they lie on the weaker side.
- **Budget.** ``trials`` counts the search's trials; ``minutes`` bounds the whole command, and the search returns
  the best edit it has seen by then (issue 36 item 7). A trial starts only when the time left, less the final fit's
  estimated time, allows; it writes its record and in-ball edits after every evaluated epoch (``--budget.partial``,
  into ``trial_<n>/partial/``); when its share (``FIT_TIME_SHARE`` of the time it was given) ends it is asked
  (SIGUSR1) to stop at its next epoch boundary and write its results; only at the whole command's deadline is a fit
  killed, and a killed trial counts with its partial record (status ``partial``). When too little time is left for
  the final fit (``MIN_FINAL_SECONDS``, or half its estimate), or the final fit ends without an edit, the best
  trial's own edit is returned with a note saying on what it was trained (``auto.json``'s ``note``).
- **Resuming.** ``PROGRESS_FILE`` records the settings and each finished trial; the same command on the folder of an
  interrupted search replays the search's draws, takes the finished trials as they were and runs the rest. A
  finished search (``auto.json``) is refused without ``overwrite``. A search that ends without an edit raises
  ``NoEditError`` (the command exits non-zero) after writing ``auto.json``.

Folder (``output_dir``, default ``runs/auto/<task>/version_N``)::

    data/                     the held-out split (when used) and the task YAMLs the fits read
    auto.progress.json        while the search runs: its settings and finished trials (for resuming)
    trial_<n>/                one fit per trial (results.json, fit.log; the best trial's edit)
    final/                    the final fit (results.json, edits/ball_<eps>/: the edit)
    auto.json                 every trial, the choice, the final edit's numbers and configuration
"""

from __future__ import annotations

import inspect
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from editing.core.errors import ConfigError, EditingError
from editing.core.files import ResultsExistError, write_json, write_jsonl, write_text
from editing.core.paths import FIT_DIR
from editing.core.textfiles import load_yaml
from editing.core.types import LossType, MethodName
from editing.data.jsonl import read_jsonl
from editing.protocol.space import Parameter, load_space
from editing.protocol.trials import run_fit, split_args
from editing.rules.budget import Ball, ball_key, choose_epochs, edit_folder_name, key_eps
from editing.rules.tasks import TaskSpec, get_task
from editing.runs.records import RESULTS_FILE, RecordError, RunRecord
from editing.runs.run_folder import PARTIAL_DIR
from editing.runs.tables import markdown_table, value_text

AUTO_FILE = "auto.json"
PROGRESS_FILE = "auto.progress.json"
"""The record of a search under way (its settings and finished trials), for resuming it; gone once
``auto.json`` is written."""
DEFAULT_ROOT = Path("runs") / "auto"

STEPS_PER_EPOCH = 8
"""The fewest optimizer steps an epoch should hold (issue 14: about 5-10)."""
MAX_ACCUMULATE = 5
"""The paper's gradient accumulation: more examples than ``5 * STEPS_PER_EPOCH`` keep it."""
TOTAL_STEPS = 120
"""Optimizer steps a search aims at in all (epochs = this over the steps per epoch, within the bounds below)."""
MIN_EPOCHS, MAX_EPOCHS = 10, 20
"""The paper trains 10 epochs; few examples get more, up to 20."""

DEFAULT_THRESHOLD = -math.log(0.2)
"""The threshold of a ``good`` task given as plain examples: the whole target has probability at least 0.2 (the
country_capital convention)."""

STRONGER: dict[str, int] = {
    "model.init_args.optimizer.lr": +1,
    "model.init_args.lora.rank": +1,
    "model.init_args.regularization.weight": -1,
    "model.init_args.memit.clamp_norm_factor": +1,
    "model.init_args.memit.covariance_weight": -1,
}
"""The settings that make an edit stronger when raised (+1) or lowered (-1), for narrowing after a weak best."""

FIRST_STRATUM: dict[str, int] = {
    **STRONGER,
    "model.init_args.lora.layer_fraction": +1,
    "model.init_args.regularization.weight": +1,  # protective: the opposite of its strength direction
}
"""The settings whose first exploring trial takes the top (+1) or bottom (-1) end of the range: strong on the task
(learning rate, rank, clamp) and protective of general text (the KL weight at the top, the LoRA block widest)."""
OVERSHOOT_LEVEL = 3
"""After a trial with no edited epoch inside the ball, the next trial of its method draws from a window of
``0.5 ** OVERSHOOT_LEVEL`` of each range on the weaker side of it: a step back, not a jump (a trial that overshot has
mostly overshot by a little: on invented facts, +2.4e-3 in a 1e-3 ball with the facts two thirds learnt)."""
MAX_STEP_BACKS = 3
"""At most this many step backs per method: a method that overshoots even then gives way to the next."""
FIRST_STRATA = 4
"""A ``FIRST_STRATUM`` setting has at least this many strata: the first trial draws from the extreme quarter."""

DEFAULT_METHODS = ("lora", "full", "memit")
MIN_TRIAL_SECONDS = 30.0
"""A trial starts only with at least this much time left (and half the method's typical trial time)."""
MIN_FINAL_SECONDS = 30.0
"""The final fit runs only with at least this much time left (and half its estimated time): else the best trial's
edit is the result."""
TRIAL_PATIENCE = 3
"""A trial stops once its objective inside the ball has not risen for this many epochs (``--budget.best_patience``):
its later epochs would have to beat its best after that long without doing so; the time goes to more trials. Three,
not fewer: an edit often leaves the ball for an epoch or two and comes back inside better (see Every epoch)."""
TRIAL_FIT_ARGS = ("--budget.epoch_rule", "best", "--budget.best_patience", str(TRIAL_PATIENCE))
"""What the trials' fits get on top of the final fit's arguments: they report (and keep the edit of) their best
epoch inside the ball by the search's objective, not only the last one (``editing.rules.budget.EPOCH_RULES``), and
stop ``TRIAL_PATIENCE`` epochs after it; the final fit keeps the test rule (the last epoch inside the ball among
epochs 0..v, v the best trial's chosen epoch)."""
FINAL_FIT_ARGS = ("--budget.stop_at_cap", "true")
"""The final fit stops after epoch v (nothing later can be reported), so it costs about v + 1 of the best trial's
evaluated epochs, and its reserve is counted so."""
FIT_TIME_SHARE = 0.75
"""The share of the time left that a fit's Lightning ``max_time`` gets: the rest covers loading the model and the
evaluations before and after training, which ``max_time`` does not count."""


# ----------------------------------------------------------------------------------------------------------------
# small-data defaults
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SmallData:
    """The accumulation and number of epochs for a number of training examples (see the module's docstring).

    Attributes:
        examples: the canonical examples a fit trains on.
        accumulate: gradient accumulation (batch size 1): ``clamp(examples // STEPS_PER_EPOCH, 1, MAX_ACCUMULATE)``.
        steps_per_epoch: ``ceil(examples / accumulate)``.
        max_epochs: ``clamp(ceil(TOTAL_STEPS / steps_per_epoch), MIN_EPOCHS, MAX_EPOCHS)``, or the epochs asked for.
    """

    examples: int
    accumulate: int
    steps_per_epoch: int
    max_epochs: int

    @classmethod
    def of(cls, examples: int, epochs: int | None = None) -> SmallData:
        """The defaults for ``examples`` training examples (``epochs``: a number of epochs asked for instead)."""
        if examples < 1:
            raise ConfigError("a fit needs at least one canonical example to train on")
        accumulate = min(MAX_ACCUMULATE, max(1, examples // STEPS_PER_EPOCH))
        steps = math.ceil(examples / accumulate)
        if epochs is None:
            epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TOTAL_STEPS / steps)))
        elif epochs < 1:
            raise ConfigError(f"--epochs {epochs}: give a number of epochs >= 1 (or leave it out for the default)")
        return cls(examples, accumulate, steps, epochs)

    def args(self) -> list[str]:
        """The ``editing fit`` arguments that set them."""
        return ["--trainer.accumulate_grad_batches", str(self.accumulate), "--trainer.max_epochs", str(self.max_epochs)]


def trains_by_gradient(method: str) -> bool:
    """Whether a method's fit config trains by gradient (it sets ``trainer.accumulate_grad_batches``): MEMIT does
    not, and keeps its one-epoch closed-form edit."""
    config = load_yaml(FIT_DIR / f"{method}.yaml", "fit config") or {}
    return "accumulate_grad_batches" in ((config.get("trainer") or {}) if isinstance(config, dict) else {})


# ----------------------------------------------------------------------------------------------------------------
# the data: a task with a validation pair, or a held-out part of the canonical examples
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Which task and split the trials and the final fit read, and how many examples they train on.

    Attributes:
        name: the task's name.
        search_task: the task (name or YAML) of the trials.
        search_split: their split.
        final_task: the task of the final fit.
        final_split: its split.
        train_examples: canonical examples a trial trains on.
        final_examples: canonical examples the final fit trains on.
        holdout: the held-out canonical examples' file indices (empty: a validation pair was used).
        holdout_files: ``{"train": path, "heldout": path}`` when examples were held out.
        generalization_measured: whether the final fit has an evaluation set of its own: plain examples without
            ``--evaluation`` have not (their evaluation file is the canonical file, so its success rate is
            training-set success, never reported as generalization).
        retrain: whether the final fit differs from the trials' (another split, or all examples).
        search_generalization_measured: the same for the trials (held-out examples are an evaluation set of their
            own; ``--holdout 0`` on plain examples without ``--evaluation`` scores the trials on their training set).
    """

    name: str
    search_task: str
    search_split: str
    final_task: str
    final_split: str
    train_examples: int
    final_examples: int
    holdout: list[int] = field(default_factory=list)
    holdout_files: dict[str, str] = field(default_factory=dict)
    generalization_measured: bool = True
    retrain: bool = True
    search_generalization_measured: bool = True
    selection: str = "validation pair"
    """What the trials are selected on (``SELECTION_RULES``): the validation pair, held-out canonical examples,
    held-out evaluation prompts per canonical example or a seeded fraction of them, or none (``--holdout 0``)."""
    selection_prompts: list[int] = field(default_factory=list)
    """The evaluation file's line indices (0-based) the trials are scored on (held-out prompts only)."""
    report_prompts: int = 0
    """How many evaluation prompts the final edit is reported on (held-out prompts only: the rest)."""


SELECTIONS = ("auto", "examples", "prompts")
"""``--selection``: ``auto`` holds out evaluation prompts when the task has its own evaluation set and canonical
examples otherwise; ``examples`` always holds out canonical examples (the rule before issue 36); ``prompts``
requires evaluation prompts."""
BY_EXAMPLE = "evaluation prompts per canonical example (by suffix)"
BY_FRACTION = "evaluation prompts, seeded fraction"
BY_EXAMPLES = "canonical examples"


def _has_validation_pair(task: TaskSpec) -> bool:
    return task.builtin or all("{split}" in getattr(task, role) for role in ("canonical", "evaluation"))


def _task_yaml(path: Path, name: str, loss: LossType, threshold: float, files: dict[str, str | None]) -> Path:
    lines = [f"name: {json.dumps(name)}", f"loss: {loss.value}", f"threshold: {threshold!r}"]
    lines += [f"{role}: {json.dumps(str(p))}" for role, p in files.items() if p is not None]
    return write_text(path, "# written by editing auto\n" + "\n".join(lines) + "\n", overwrite=True)


def plan_data(task: str, folder: Path, holdout: float = 0.25, seed: int = 0, loss: str = "good",
              threshold: float | None = None, evaluation: str | None = None,
              hard_negatives: str | None = None, selection: str = "auto") -> Plan:
    """Decide (and write, under ``folder``) the data of the search and of the final fit.

    Without a validation pair, a task with evaluation prompts of its own (a task YAML whose evaluation file is not
    its canonical file, or plain examples with ``--evaluation``) is searched on a held-out part of those prompts
    (``selected_prompts``), trained on every canonical example, and reported on the other prompts; without them
    (or with ``selection="examples"``) whole canonical examples are held out, as before.

    Args:
        task: a built-in task, a task YAML, or a JSONL of canonical examples.
        folder: where the held-out split and the task YAMLs go.
        holdout: the fraction of the evaluation prompts (or canonical examples) held out without a validation pair
            (0: none; the trials are scored on the task's evaluation set, reused by the final: optimistic).
        seed: the seed of the held-out choice.
        loss: the loss type of plain examples.
        threshold: the threshold of plain examples (default: -ln 0.2 for ``good``; required otherwise).
        evaluation: plain examples' evaluation set (JSONL), if any.
        hard_negatives: plain examples' hard negatives (JSONL), if any.
        selection: one of ``SELECTIONS``.
    """
    if not 0 <= holdout < 1:
        raise ConfigError(f"--holdout {holdout}: give the fraction of canonical examples to hold out, in [0, 1)")
    if selection not in SELECTIONS:
        raise ConfigError(f"--selection {selection!r}: expected one of {', '.join(SELECTIONS)} (auto: the default)")
    folder.mkdir(parents=True, exist_ok=True)
    if task.endswith(".jsonl"):
        spec, written = _examples_task(task, folder, loss, threshold, evaluation, hard_negatives)
        # every fit reads the task YAML written for the examples: `editing fit` knows no task "facts.jsonl"
        task = str(written.resolve())
        measured = evaluation is not None
    else:
        if evaluation is not None or hard_negatives is not None:
            raise ConfigError("--evaluation and --hard_negatives go with plain examples (--task FILE.jsonl); a task "
                              "YAML names its own files")
        spec = get_task(task)
        measured = True
    if _has_validation_pair(spec):
        dm_examples = {split: len(read_jsonl(spec.file("canonical", split, _root(spec)), _kind(spec)))
                       for split in ("val", "test")}
        return Plan(spec.name, task if spec.builtin else _source(spec, task), "val", task if spec.builtin else
                    _source(spec, task), "test", dm_examples["val"], dm_examples["test"])
    source = _source(spec, task)
    path = spec.file("canonical", "val", None)
    records = read_jsonl(path, _kind(spec))
    n = len(records)
    if holdout == 0 and selection == "prompts":
        raise ConfigError("--selection prompts with --holdout 0 holds nothing out: give --holdout in (0, 1)")
    if holdout == 0:
        return Plan(spec.name, source, "val", source, "val", n, n, generalization_measured=measured, retrain=False,
                    search_generalization_measured=measured, selection="none")
    prompts = spec.file("evaluation", "val", None)
    has_prompts = prompts is not None and prompts.resolve() != path.resolve()
    if selection == "prompts" and not has_prompts:
        raise ConfigError(f"--selection prompts: {spec.name} has no evaluation prompts of its own (its evaluation "
                          "file is its canonical file); give --evaluation FILE, or --selection auto")
    if has_prompts and selection != "examples":
        return _plan_on_prompts(spec, folder, records, prompts, holdout, seed)
    return _plan_on_examples(spec, folder, records, path, holdout, seed, source, measured)


def _plan_on_examples(spec: TaskSpec, folder: Path, records: list, path: Path, holdout: float, seed: int,
                      source: str, measured: bool) -> Plan:
    """The search on held-out canonical examples, the final fit on all of them (see ``plan_data``)."""
    n = len(records)
    if n < 2:
        raise ConfigError(f"{path}: one canonical example cannot be split into training and held-out examples; give "
                          "more examples, a task with a validation pair ({split} in its paths), or --holdout 0")
    held = max(1, min(n - 1, round(holdout * n)))
    chosen = sorted(random.Random(seed).sample(range(n), held))
    heldout = set(chosen)
    _warn_leaks(path, records, heldout)
    train_rows = [r.fields for r in records if r.index not in heldout]
    held_rows = [r.fields for r in records if r.index in heldout]
    train_file = write_jsonl(folder / "canonical-train.jsonl", train_rows, overwrite=True)
    held_file = write_jsonl(folder / "canonical-heldout.jsonl", held_rows, overwrite=True)
    files = {"canonical": str(train_file.resolve()), "evaluation": str(held_file.resolve()),
             "targeted": _abs(spec, "targeted"), "hard_negatives": _abs(spec, "hard_negatives")}
    search = _task_yaml(folder / "search_task.yaml", spec.name, spec.loss, spec.threshold, files)
    return Plan(spec.name, str(search.resolve()), "val", source, "val", n - held, n, holdout=chosen,
                holdout_files={"train": str(train_file), "heldout": str(held_file)},
                generalization_measured=measured, retrain=True, selection=BY_EXAMPLES)


def _held_count(holdout: float, k: int) -> int:
    return max(1, min(k - 1, round(holdout * k)))


def selected_prompts(canonical: list, prompts: list, holdout: float, seed: int) -> tuple[str, list[int]]:
    """The rule and the evaluation prompts (0-based indices) the search is scored on (``plan_data``'s rule).

    When every prompt has the suffixes of exactly one canonical example, the prompts are held out per canonical
    example: of an example's ``k >= 2`` prompts, ``max(1, min(k - 1, round(holdout * k)))`` drawn by
    ``random.Random(seed)`` (the examples in file order, one generator); an example with one prompt keeps it in the
    reported part. Otherwise a seeded fraction of all ``m`` prompts: ``max(1, min(m - 1, round(holdout * m)))``.

    Args:
        canonical: the canonical records.
        prompts: the evaluation records.
        holdout: the fraction held out.
        seed: the seed of the choice.

    Returns:
        ``(BY_EXAMPLE or BY_FRACTION, sorted indices)``.
    """
    owners: dict[tuple, list[int]] = {}
    for r in canonical:
        owners.setdefault(tuple(r.suffixes), []).append(r.index)
    groups: dict[int, list[int]] = {}
    for j, p in enumerate(prompts):
        owner = owners.get(tuple(p.suffixes), [])
        if len(owner) != 1:  # no canonical example, or several, share its target: no mapping
            groups = {}
            break
        groups.setdefault(owner[0], []).append(j)
    rng = random.Random(seed)
    if any(len(g) >= 2 for g in groups.values()):
        chosen = []
        for i in sorted(groups):
            if len(groups[i]) >= 2:
                chosen += rng.sample(groups[i], _held_count(holdout, len(groups[i])))
        return BY_EXAMPLE, sorted(chosen)
    if len(prompts) < 2:
        raise ConfigError("one evaluation prompt cannot be split into selection and reported prompts; give more "
                          "prompts, or --selection examples")
    return BY_FRACTION, sorted(rng.sample(range(len(prompts)), _held_count(holdout, len(prompts))))


def _plan_on_prompts(spec: TaskSpec, folder: Path, records: list, path: Path, holdout: float, seed: int) -> Plan:
    """The search on held-out evaluation prompts, the final fit reported on the rest (see ``plan_data``)."""
    prompts = read_jsonl(path, _kind(spec))
    rule, chosen = selected_prompts(records, prompts, holdout, seed)
    picked = set(chosen)
    selection_file = write_jsonl(folder / "evaluation-selection.jsonl",
                                 [p.fields for p in prompts if p.index in picked], overwrite=True)
    report_file = write_jsonl(folder / "evaluation-report.jsonl",
                              [p.fields for p in prompts if p.index not in picked], overwrite=True)
    base = {"canonical": str(spec.file("canonical", "val", None).resolve()), "targeted": _abs(spec, "targeted"),
            "hard_negatives": _abs(spec, "hard_negatives")}
    search = _task_yaml(folder / "search_task.yaml", spec.name, spec.loss, spec.threshold,
                        {**base, "evaluation": str(selection_file.resolve())})
    final = _task_yaml(folder / "final_task.yaml", spec.name, spec.loss, spec.threshold,
                       {**base, "evaluation": str(report_file.resolve())})
    n = len(records)
    return Plan(spec.name, str(search.resolve()), "val", str(final.resolve()), "val", n, n,
                holdout_files={"selection": str(selection_file), "report": str(report_file)}, retrain=True,
                selection=rule, selection_prompts=chosen, report_prompts=len(prompts) - len(chosen))


def _warn_leaks(path: Path, records: list, heldout: set[int]) -> None:
    """Warn when a held-out canonical example has a copy among the training ones: the trials would then be scored
    on examples they trained on, and the search would favour edits that memorise."""
    lines: dict[tuple, list[int]] = {}
    for r in records:
        lines.setdefault((r.prefix, tuple(r.suffixes)), []).append(r.index)
    leaks = [[records[i].line for i in same] for same in lines.values()
             if len(same) > 1 and heldout & set(same) and set(same) - heldout]
    if leaks:
        shown = "; ".join("lines " + ", ".join(map(str, group)) for group in leaks[:5])
        more = f" (and {len(leaks) - 5} more)" if len(leaks) > 5 else ""
        print(f"warning: {path}: duplicate canonical examples ({shown}{more}) are split between the held-out and the "
              "training examples, so held-out copies leak into training and the trials' held-out scores are "
              "training-set scores; remove the duplicate lines", file=sys.stderr, flush=True)


def _root(spec: TaskSpec) -> str | None:
    if not spec.builtin:
        return None
    from editing.core.paths import resolve_data_root

    return str(resolve_data_root(None))


def _kind(spec: TaskSpec) -> str:
    return "pair" if spec.pair else "single"


def _abs(spec: TaskSpec, role: str) -> str | None:
    path = spec.file(role, "val", None)
    return None if path is None else str(path.resolve())


def _source(spec: TaskSpec, task: str) -> str:
    return spec.name if spec.builtin else str(Path(task).resolve()) if task.endswith((".yaml", ".yml")) else task


def _examples_task(path: str, folder: Path, loss: str, threshold: float | None, evaluation: str | None,
                   hard_negatives: str | None) -> tuple[TaskSpec, Path]:
    """A task YAML (written under ``folder``) for plain examples, and its path: the canonical file, and the
    evaluation set given or, without one, the canonical file again (then generalization is not measured)."""
    loss_type = LossType(loss)
    if threshold is None:
        if loss_type is not LossType.GOOD:
            raise ConfigError(f"--threshold: plain examples of loss {loss_type.value!r} need a threshold (an example "
                              "fails when its score is above it, SPEC section 5)")
        threshold = DEFAULT_THRESHOLD
    for given, what in ((path, "--task"), (evaluation, "--evaluation"), (hard_negatives, "--hard_negatives")):
        if given is not None and not Path(given).is_file():
            raise ConfigError(f"{what} {given}: no such file")
    files = {"canonical": str(Path(path).resolve()), "evaluation": str(Path(evaluation or path).resolve()),
             "hard_negatives": None if hard_negatives is None else str(Path(hard_negatives).resolve())}
    written = _task_yaml(folder / "task.yaml", Path(path).stem, loss_type, float(threshold), files)
    return get_task(str(written)), written


# ----------------------------------------------------------------------------------------------------------------
# drawing configurations
# ----------------------------------------------------------------------------------------------------------------
def _unit(param: Parameter, value: Any) -> float:
    """A value's position in its range, in [0, 1] (log scale for ``log10_uniform``)."""
    low, high = param.args
    if high == low:
        return 0.5
    x = math.log10(value) if param.kind == "log10_uniform" else float(value)
    return min(1.0, max(0.0, (x - low) / (high - low)))


def _value(param: Parameter, unit: float) -> Any:
    low, high = param.args
    x = low + min(1.0, max(0.0, unit)) * (high - low)
    if param.kind == "log10_uniform":
        return float(10.0 ** x)
    if param.kind == "int_uniform":
        return int(min(high, max(low, round(x))))
    return float(x)


def explore_orders(space: dict[str, Parameter], count: int, rng: random.Random) -> dict[str, list[int]]:
    """Per setting, the order in which ``count`` exploring trials use its strata: for ``FIRST_STRATUM`` settings the
    extreme stratum first (then the next one inwards, ...), at least ``FIRST_STRATA`` of them, so that a single
    exploring trial still takes the extreme quarter of the range; a seeded permutation for the others."""
    orders = {}
    for key in space:
        end = FIRST_STRATUM.get(key, 0)
        strata = max(count, FIRST_STRATA)
        if end > 0:
            orders[key] = list(range(strata - 1, -1, -1))
        elif end < 0:
            orders[key] = list(range(strata))
        else:
            orders[key] = rng.sample(range(count), count)
    return orders


def explore_draw(space: dict[str, Parameter], index: int, count: int, rng: random.Random,
                 order: dict[str, list[int]]) -> dict[str, Any]:
    """The ``index``-th of ``count`` exploring draws: per setting, a uniform draw inside one of its equal strata
    (``len(order[key])`` of them, ``count`` unless ``explore_orders`` gave more), each stratum used at most once
    (``order``: the strata in the order the trials use them)."""
    params = {}
    for key, param in space.items():
        if param.kind == "categorical":
            params[key] = param.args[order[key][index] % len(param.args)]
            continue
        stratum = order[key][index]
        params[key] = _value(param, (stratum + rng.random()) / len(order[key]))
    return params


def narrowed_draw(space: dict[str, Parameter], best: dict[str, Any], level: int, direction: int,
                  rng: random.Random) -> dict[str, Any]:
    """A draw from windows around ``best`` whose width (as a fraction of each range) is ``0.5 ** level``.

    ``direction`` +1 (the best edit was too weak) puts the windows of ``STRONGER`` settings on their stronger side
    of ``best``, -1 (too strong) on their weaker side, 0 centres every window on ``best``."""
    width = 0.5 ** level
    params = {}
    for key, param in space.items():
        if key not in best:
            params[key] = _value(param, rng.random()) if param.kind != "categorical" else rng.choice(param.args)
            continue
        if param.kind == "categorical":
            params[key] = best[key] if rng.random() < 0.75 else rng.choice(param.args)
            continue
        centre = _unit(param, best[key])
        side = STRONGER.get(key, 0) * direction
        low = centre - width / 2 if side == 0 else centre if side > 0 else centre - width
        params[key] = _value(param, low + rng.random() * width)
    return params


# ----------------------------------------------------------------------------------------------------------------
# trials
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One fit of the search (or the final fit) and its outcome in the ball."""

    number: int
    method: str
    params: dict[str, Any]
    phase: str
    folder: str
    status: str = "pending"
    seconds: float | None = None
    epoch: int | None = None
    last_epoch: int | None = None
    reliability: float | None = None
    reliability_mean_score: float | None = None
    generalization: float | None = None
    generalization_mean_score: float | None = None
    locality: float | None = None
    degradation: float | None = None
    objective: float | None = None
    error: str | None = None
    last_inside: bool | None = None
    """Whether its last evaluated epoch is inside the ball (the edit had not left it at the end)."""

    @property
    def ok(self) -> bool:
        """Whether the fit finished with results."""
        return self.status in ("finished", "diverged", "partial")

    @property
    def weak(self) -> bool:
        """The edit ended inside the ball (its last epoch is inside) and is not fully reliable: too weak."""
        inside = self.last_inside if self.last_inside is not None else self.epoch == self.last_epoch
        return self.ok and inside and (self.reliability or 0.0) < 1.0

    @property
    def strong(self) -> bool:
        """No edited epoch is inside the ball (its ball epoch is 0): too strong."""
        return self.ok and self.epoch == 0 and (self.last_epoch or 0) > 0

    @property
    def direction(self) -> int:
        """Where the next draws should go: +1 stronger (too weak), -1 weaker (too strong), 0 around it."""
        return 1 if self.weak else -1 if self.strong else 0

    def key(self) -> tuple:
        """The ranking key: objective, then lower mean canonical score, smaller degradation, earlier trial."""
        score = self.reliability_mean_score
        return (self.objective if self.objective is not None else -math.inf,
                -score if score is not None and math.isfinite(score) else -math.inf,
                -(self.degradation if self.degradation is not None else math.inf), -self.number)

    def read_results(self, key: str, partial: bool = False) -> None:
        """Fill the outcome from the fit's ``results.json`` at ball ``key`` (``partial``: from the record it wrote
        after its last evaluated epoch before it was killed; status ``partial``)."""
        run = RunRecord.read(Path(self.folder) / (PARTIAL_DIR if partial else ".") / RESULTS_FILE)
        ball = run.balls[key]
        m = ball.metrics
        self.status = "partial" if partial else run.status.value
        self.epoch, self.last_epoch = ball.epoch, run.epochs[-1].epoch
        history = [e.to_dict() for e in run.epochs]
        self.last_inside = choose_epochs(history, (key_eps(key),))[key] == self.last_epoch
        self.reliability, self.reliability_mean_score = m.reliability, m.reliability_mean_score
        self.generalization, self.generalization_mean_score = m.success_rate, m.generalization_mean_score
        self.locality, self.degradation = m.locality, m.degradation
        self.objective = (self.reliability or 0.0) + (self.generalization or 0.0)

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)

    def edit_folder(self, key: str) -> Path:
        """Where its edit at ball ``key`` is (the partial record's, for a trial killed at the deadline)."""
        return Path(self.folder) / (PARTIAL_DIR if self.status == "partial" else ".") / "edits" / edit_folder_name(key)

    def has_edit(self, key: str) -> bool:
        """Whether it holds an edit inside ball ``key`` (an edited epoch: epoch 0 is the unedited model)."""
        return self.ok and bool(self.epoch) and self.edit_folder(key).is_dir()


def run_fit_until(args: Sequence[str], log_path: Path, deadline: float | None,
                  clock: Callable[[], float] = time.monotonic, soft_deadline: float | None = None) -> int:
    """``editing fit <args>`` in a subprocess (this checkout's code), output to ``log_path``; asked to stop at its
    next epoch boundary from ``soft_deadline`` on, killed at ``deadline`` (``clock`` times; None: never). Returns the
    exit code (-9 when killed)."""
    return run_fit(args, log_path, deadline=deadline, clock=clock, soft_deadline=soft_deadline)


def _with_soft_deadline(runner: Callable, soft_deadline: float | None) -> Callable:
    """The runner, given the soft deadline when it takes one (a runner of three arguments, as tests write, runs its
    fits without)."""
    try:
        takes = "soft_deadline" in inspect.signature(runner).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes or soft_deadline is None:
        return runner
    return lambda a, p, d: runner(a, p, d, soft_deadline=soft_deadline)


def _max_time(seconds: float) -> str:
    """Lightning's ``max_time`` (``DD:HH:MM:SS``) for a number of seconds (at least one)."""
    s = max(1, int(seconds))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------------
# the search
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class AutoResult:
    """What ``editing auto`` found: the chosen configuration and the final edit with its numbers."""

    folder: str
    task: str
    model: str
    ball: str
    methods: list[str]
    budget: dict
    plan: dict
    small_data: dict
    trials: list[Trial]
    best: int | None
    final: Trial | None
    edit: str | None
    config: dict
    seconds: float
    note: str | None = None
    """Set when the edit is not the final fit's: on what it was trained (the best trial's training split)."""

    def to_dict(self) -> dict:
        """The layout of ``auto.json``."""
        out = asdict(self)
        out["trials"] = [t.to_dict() for t in self.trials]
        out["final"] = None if self.final is None else self.final.to_dict()
        return out


def _default_folder(name: str) -> Path:
    root = DEFAULT_ROOT / name
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"


def auto_edit(task: str, methods: list[str] | None = None, ball: float = 1e-3,
              trials: int | None = None, minutes: float | None = None, model: str = "smollm2-135m",
              output_dir: str | None = None, holdout: float = 0.25, explore: int = 1, epochs: int | None = None,
              patience: int | None = None, args: str | None = None, loss: str = "good", threshold: float | None = None,
              evaluation: str | None = None, hard_negatives: str | None = None, seed: int = 0,
              overwrite: bool = False, selection: str = "auto", clock: Callable[[], float] | None = None,
              runner: Callable[[list[str], Path, float | None], int] | None = None) -> AutoResult:
    """Search hyperparameters for the best edit inside a degradation ball, within a budget of trials or minutes.

    Prints each trial as it ends, then the chosen configuration and the final edit's reliability, generalization,
    locality and degradation; writes ``auto.json`` and the edit (``<output_dir>/final/edits/ball_<eps>``).

    Args:
        task: a built-in task, a task YAML, or a JSONL of canonical examples (``{"prefix", "suffix"}`` lines).
        methods: the methods to choose among (each with a search space in ``lightning_configs/sweeps/``; default
            lora, full and memit).
        ball: the ball's eps: the edit's general NLL must stay below ``(1 + eps)`` times the unedited model's.
        trials: the number of search trials (the final fit comes on top).
        minutes: the time the whole command may take (search and final fit); give ``trials``, ``minutes`` or both.
        model: the base model (``--model.init_args.base.name`` of every fit).
        output_dir: the folder of the search (default ``runs/auto/<task>/version_N``).
        holdout: the fraction of canonical examples held out for validation when the task has no validation pair
            (0: select on the task's own evaluation set, whose numbers are then optimistic).
        explore: trials per method spread over its whole search space before the search narrows (1: only the
            strongest corner of each method's space, then the bisection of the edit's strength).
        epochs: epochs per fit (default: the small-data rule, 10 to 20).
        patience: stop a fit after this many epochs outside the ball (None: train every epoch).
        args: more ``editing fit`` arguments for every fit, one string (e.g. ``"--data.general_limit 200"`` to
            measure the ball on the first 200 texts of G, faster and noisier).
        loss: the loss type of plain examples (``good``, ``bad``, ``balance``, ``good-v-bad``).
        threshold: the threshold of plain examples (default -ln 0.2 for ``good``).
        evaluation: plain examples' evaluation set (a JSONL), if any.
        hard_negatives: plain examples' hard negatives (a JSONL), if any.
        seed: the seed of the held-out split, the draws and every fit.
        selection: what the search is scored on without a validation pair (``SELECTIONS``): ``auto`` holds out
            evaluation prompts when the task has its own (per canonical example when they map to one by suffix,
            else a seeded fraction; the final edit is reported on the rest), else canonical examples;
            ``examples`` always holds out canonical examples; ``prompts`` requires evaluation prompts.
        overwrite: empty ``output_dir`` and search again from scratch. Without it a finished search there (its
            ``auto.json``) is refused and an interrupted one (``auto.progress.json``) is resumed: its finished trials
            are kept, the rest run (the same settings are required; the budget may change).
        clock: the clock of the budget (tests replace it).
        runner: runs one fit: ``runner(args, log_path, deadline)`` (tests replace it).

    Returns:
        The search's outcome (also in ``auto.json``).

    Raises:
        NoEditError: the search ended without an edit inside the ball (``auto.json`` is written first).
        ResultsExistError: ``output_dir`` holds a finished search, or files of something else.
    """
    search = _open_search(task=task, methods=methods, ball=ball, trials=trials, minutes=minutes, model=model,
                          output_dir=output_dir, holdout=holdout, explore=explore, epochs=epochs, patience=patience,
                          args=args, loss=loss, threshold=threshold, evaluation=evaluation,
                          hard_negatives=hard_negatives, seed=seed, overwrite=overwrite, clock=clock, runner=runner,
                          selection=selection)
    search.run_trials()
    return search.finish()


def _checked_inputs(trials: int | None, minutes: float | None, explore: int, ball: float,
                    methods: list[str] | None) -> tuple[Ball, list[str], dict[str, dict[str, Parameter]]]:
    """The budget, the ball and the methods (with their search spaces), checked before anything is written."""
    if trials is None and minutes is None:
        raise ConfigError("give a budget: --trials N (search trials) and/or --minutes M (the whole command)")
    if trials is not None and trials < 1:
        raise ConfigError(f"--trials {trials}: give at least one trial")
    if minutes is not None and not minutes > 0:
        raise ConfigError(f"--minutes {minutes}: give a positive number of minutes")
    if explore < 1:
        raise ConfigError(f"--explore {explore}: give at least one exploring trial per method")
    the_ball = Ball(float(ball))
    names = [MethodName(m).value for m in (methods or DEFAULT_METHODS)]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--methods {methods}: list each method once")
    spaces = {m: load_space(m) for m in names}
    for m in names:
        if not (FIT_DIR / f"{m}.yaml").is_file():
            raise ConfigError(f"method {m!r} has no fit config {FIT_DIR / (m + '.yaml')}")
    return the_ball, names, spaces


def _open_search(*, task: str, methods: list[str] | None, ball: float, trials: int | None, minutes: float | None,
                 model: str, output_dir: str | None, holdout: float, explore: int, epochs: int | None,
                 patience: int | None, args: str | None, loss: str, threshold: float | None, evaluation: str | None,
                 hard_negatives: str | None, seed: int, overwrite: bool, clock: Callable[[], float] | None,
                 runner: Callable[[list[str], Path, float | None], int] | None, selection: str = "auto") -> _Search:
    """``auto_edit``'s first steps: check its inputs, claim the folder (an interrupted search in it is resumed), plan
    the data and print the plan. The budget's clock starts here, before anything else."""
    start_clock = clock or time.monotonic
    started = start_clock()
    the_ball, names, spaces = _checked_inputs(trials, minutes, explore, ball, methods)
    key = ball_key(the_ball)
    deadline = None if minutes is None else started + 60.0 * minutes
    runner = runner or (lambda a, p, d, soft_deadline=None: run_fit_until(a, p, d, start_clock, soft_deadline))

    name = Path(task).stem if task.endswith(".jsonl") else get_task(task).name
    folder = Path(output_dir) if output_dir else _default_folder(name)
    settings = _search_settings(task, names, key, model, holdout, explore, epochs, patience, args, loss, threshold,
                                evaluation, hard_negatives, seed)
    if selection != "auto":  # a search before --selection existed resumes with its settings as they were
        settings["selection"] = selection
    kept = _claim_folder(folder, settings, overwrite)
    progress = {"settings": settings, "trials": [t.to_dict() for t in kept]}
    write_json(folder / PROGRESS_FILE, progress, overwrite=True)
    plan = plan_data(task, folder / "data", holdout, seed, loss, threshold, evaluation, hard_negatives, selection)
    prefixes = context_prefixes(split_args(args))
    small = SmallData.of(plan.train_examples * (1 + prefixes), epochs)
    fixed = [*split_args(args), "--budget.balls", f"[{the_ball.eps!r}]", "--seed_everything", str(seed),
             "--data.seed", str(seed), "--budget.partial", "true"]
    if patience is not None:
        fixed += ["--budget.patience", str(patience)]
    print(f"editing auto: {plan.name} on {model}, methods {', '.join(names)}, ball {key}; budget "
          f"{_budget_text(trials, minutes)}; {folder}", flush=True)
    print(_plan_text(plan, small), flush=True)
    if kept:
        print(f"resuming the interrupted search in {folder}: its {len(kept)} finished trial(s) are kept", flush=True)
    return _Search(task=task, names=names, spaces=spaces, key=key, model=model, args=args, folder=folder, plan=plan,
                   small=small, fixed=fixed, explore=explore, trials=trials, minutes=minutes, kept=kept,
                   progress=progress, started=started, deadline=deadline, clock=start_clock, runner=runner,
                   rng=random.Random(seed))


@dataclass
class _Search:
    """A search under way (``auto_edit``'s state): its settings, the plan of its data, its draws and its trials.

    ``run_trials`` runs the search's trials (taking those of an interrupted search as they were), ``finish`` the
    final fit and the record (``auto.json``) and the summary.
    """

    task: str
    names: list[str]
    spaces: dict[str, dict[str, Parameter]]
    key: str
    model: str
    args: str | None
    folder: Path
    plan: Plan
    small: SmallData
    fixed: list[str]
    explore: int
    trials: int | None
    minutes: float | None
    kept: list[Trial]
    progress: dict
    started: float
    deadline: float | None
    clock: Callable[[], float]
    runner: Callable[[list[str], Path, float | None], int]
    rng: random.Random
    done: list[Trial] = field(default_factory=list)
    note: str | None = None

    def __post_init__(self) -> None:
        self.orders = {m: explore_orders(self.spaces[m], self.explore, self.rng) for m in self.names}
        # one of each method first, then the second of each
        self.queue = [(m, i) for i in range(self.explore) for m in self.names]
        self.narrowing: dict[str, int] = {m: 0 for m in self.names}
        self.step_backs: dict[str, int] = {m: 0 for m in self.names}

    def remaining(self) -> float:
        """Seconds left of the whole command's budget (infinite without ``minutes``)."""
        return math.inf if self.deadline is None else self.deadline - self.clock()

    def final_reserve(self) -> float:
        """Seconds kept for the final fit: the best trial's time, scaled to the final fit's examples and to the
        epochs 0..v it trains and evaluates (v its chosen epoch; ``FINAL_FIT_ARGS``) of the trial's 0..last, plus
        20%."""
        best = _best(self.done)
        if best is None or best.seconds is None or not self.plan.retrain:
            return 0.0
        epochs = 1.0
        if best.epoch is not None and best.last_epoch is not None:
            epochs = min(1.0, (best.epoch + 1) / (best.last_epoch + 1))
        return 1.2 * best.seconds * epochs * self.plan.final_examples / self.plan.train_examples

    def typical_seconds(self, method: str) -> float:
        """The mean time of the method's trials so far (of any trial when it has none yet; 0 before the first)."""
        seen = [t.seconds for t in self.done if t.method == method and t.seconds is not None]
        seen = seen or [t.seconds for t in self.done if t.seconds is not None]
        return sum(seen) / len(seen) if seen else 0.0

    def fit_args_of(self, method: str) -> list[str]:
        """The arguments of every fit of ``method``: the fixed ones, and the small-data defaults if it trains by
        gradient."""
        return self.fixed + (self.small.args() if trains_by_gradient(method) else [])

    def next_draw(self, number: int) -> tuple[str, dict[str, Any], str]:
        """The method, settings and phase of trial ``number``: a step back after an overshoot, else the next
        exploring trial, else a narrowing around the best trial."""
        last = self.done[-1] if self.done else None
        if last is not None and last.strong and self.step_backs[last.method] < MAX_STEP_BACKS:
            # step back on a method that overshot before exploring the next: it showed that the method moves the
            # examples; what it needs is less strength, found in a step or two
            method = last.method
            self.step_backs[method] += 1
            params = narrowed_draw(self.spaces[method], last.params, OVERSHOOT_LEVEL, -1, self.rng)
            return method, params, "step back (weaker)"
        if self.queue:
            method, index = self.queue.pop(0)
            params = explore_draw(self.spaces[method], index, self.explore, self.rng, self.orders[method])
            return method, params, "explore"
        best = _best(self.done)
        if best is None:  # every trial failed: explore again
            method = self.names[number % len(self.names)]
            params = explore_draw(self.spaces[method], number % self.explore, self.explore, self.rng,
                                  self.orders[method])
            return method, params, "explore"
        method = best.method
        self.narrowing[method] += 1
        params = narrowed_draw(self.spaces[method], best.params, self.narrowing[method], best.direction, self.rng)
        turn = {1: " (stronger)", -1: " (weaker)", 0: ""}[best.direction]
        return method, params, f"narrow {self.narrowing[method]}{turn}"

    def run_trials(self) -> None:
        """The search: trials until ``trials`` are done or the time left (less the final fit's) is too short."""
        number = 0
        while self.trials is None or number < self.trials:
            method, params, phase = self.next_draw(number)
            if number < len(self.kept):
                # the same settings and seed draw the same trials in the same order: this one finished before the
                # interruption, so its outcome is taken as it was (no budget spent on it)
                trial = _kept_trial(self.kept[number], number, method, params, phase, self.folder)
                self.done.append(trial)
                print(_trial_line(trial, self.plan.search_generalization_measured) + " (kept)", flush=True)
                _keep_best_edit(self.done, self.key)
                number += 1
                continue
            left = self.remaining() - self.final_reserve()
            if left < max(MIN_TRIAL_SECONDS, 0.5 * self.typical_seconds(method)):
                print(f"budget: {max(0.0, self.remaining()):.0f}s left, {self.final_reserve():.0f}s of them kept for "
                      "the final fit: no more trials", flush=True)
                break
            self.run_trial(Trial(number, method, params, phase, str((self.folder / f"trial_{number}").resolve())),
                           left)
            number += 1

    def run_trial(self, trial: Trial, left: float) -> None:
        """Fit one trial in the ``left`` seconds it may take, record it (``auto.progress.json``) and keep only the
        best trial's edit."""
        _set_aside(Path(trial.folder))
        share = None if self.deadline is None else FIT_TIME_SHARE * left
        fit = _fit_args(trial.method, self.plan.search_task, self.plan.search_split, self.model, Path(trial.folder),
                        trial.params, [*self.fit_args_of(trial.method), *TRIAL_FIT_ARGS], share)
        # past its share the trial is asked to stop at its next epoch boundary; only the command's own deadline
        # kills it, and what it wrote by then (its partial record) still counts
        soft = None if share is None else self.clock() + share
        _run(trial, fit, _with_soft_deadline(self.runner, soft), self.deadline, self.key, self.clock)
        if not self.plan.search_generalization_measured:
            _drop_training_generalization(trial)
        self.done.append(trial)
        print(_trial_line(trial, self.plan.search_generalization_measured), flush=True)
        _keep_best_edit(self.done, self.key)
        self.progress["trials"].append(trial.to_dict())
        write_json(self.folder / PROGRESS_FILE, self.progress, overwrite=True)

    def final_fit(self, best: Trial) -> tuple[Trial, dict]:
        """The final edit with the best trial's configuration (the best trial itself when the final fit would read
        the same data) and that configuration."""
        config = {"method": best.method, "params": best.params,
                  "fit_args": ([*self.small.args()] if trains_by_gradient(best.method) else []) + split_args(self.args),
                  "base_config": str(FIT_DIR / f"{best.method}.yaml"), "model": self.model, "ball": self.key}
        if not self.plan.retrain:
            return best, config
        time_left = self.remaining()
        estimate = self.final_reserve() / 1.2
        if time_left < max(MIN_FINAL_SECONDS, 0.5 * estimate) and best.has_edit(self.key):
            self.note = self._trial_edit_note(best, f"no time was left for the final fit ({max(0.0, time_left):.0f}s "
                                                    f"of the budget, about {estimate:.0f}s needed)")
            print(f"budget: {self.note}", flush=True)
            return best, config
        final = Trial(-1, best.method, best.params, "final", str((self.folder / "final").resolve()))
        _set_aside(Path(final.folder))
        # The test rule (SPEC section 6), as `editing test-runs` applies it: the final fit reports the last epoch
        # inside the ball among epochs 0..v, v the best trial's ball epoch (the epoch chosen at validation)
        config["max_epoch"] = {self.key: best.epoch}
        fit = _fit_args(best.method, self.plan.final_task, self.plan.final_split, self.model, Path(final.folder),
                        best.params, [*self.fit_args_of(best.method), *FINAL_FIT_ARGS],
                        None if self.deadline is None else max(1.0, FIT_TIME_SHARE * time_left),
                        max_epoch=config["max_epoch"])
        soft = None if self.deadline is None else self.clock() + FIT_TIME_SHARE * max(0.0, time_left)
        _run(final, fit, _with_soft_deadline(self.runner, soft), self.deadline, self.key, self.clock)
        if not self.plan.generalization_measured:
            _drop_training_generalization(final)
        print(_trial_line(final, self.plan.generalization_measured), flush=True)
        if not final.has_edit(self.key) and best.has_edit(self.key):
            why = f"the final fit {final.status}" + (f" ({final.error})" if final.error else " without an edit")
            self.note = self._trial_edit_note(best, why)
            print(f"budget: {self.note}", flush=True)
            return best, config
        if final.status == "partial":
            self.note = (f"the final fit was killed at the deadline: the edit is its record after epoch "
                         f"{final.last_epoch} (of {self.small.max_epochs} planned), trained on all "
                         f"{self.plan.final_examples} canonical examples")
            print(f"budget: {self.note}", flush=True)
        return final, config

    def _trial_edit_note(self, best: Trial, why: str) -> str:
        """What the result says when it is a trial's edit, not the final fit's: why, and on what it was trained."""
        if self.plan.selection_prompts:
            data = (f"all {self.plan.train_examples} canonical examples, and its numbers are on the "
                    f"{len(self.plan.selection_prompts)} evaluation prompts the search selected on, not on the "
                    f"{self.plan.report_prompts} held out for the final report")
        elif self.plan.holdout:
            data = (f"the search's training split ({self.plan.train_examples} of {self.plan.final_examples} canonical "
                    f"examples; the {len(self.plan.holdout)} held out were not trained on), and its numbers are on "
                    "those held-out examples, not on the task's evaluation set")
        else:
            data = (f"the search's training split (the validation pair's {self.plan.train_examples} canonical "
                    f"examples, not the test pair's {self.plan.final_examples}), and its numbers are on the "
                    "validation pair")
        partial = " (its partial record: the fit was killed at the deadline)" if best.status == "partial" else ""
        return f"{why}: the edit is trial {best.number}'s{partial}, trained on {data}"

    def finish(self) -> AutoResult:
        """The final fit, then ``auto.json`` (in place of ``auto.progress.json``) and the summary; ``NoEditError``
        when there is no edit inside the ball."""
        best = _best(self.done)
        final: Trial | None = None
        edit: str | None = None
        config: dict = {}
        if best is None:
            print("no trial finished: no edit (see the trials' fit.log)", flush=True)
        else:
            final, config = self.final_fit(best)
            # an edit at epoch 0 is the unedited model: no edit stayed inside the ball
            edit = str(final.edit_folder(self.key)) if final.has_edit(self.key) else None
        result = AutoResult(folder=str(self.folder), task=self.task, model=self.model, ball=self.key,
                            methods=self.names, budget={"trials": self.trials, "minutes": self.minutes},
                            plan=asdict(self.plan), small_data=asdict(self.small), trials=self.done,
                            best=None if best is None else best.number, final=final, edit=edit, config=config,
                            seconds=round(self.clock() - self.started, 1), note=self.note)
        write_json(self.folder / AUTO_FILE, result.to_dict(), overwrite=True)
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)  # auto.json now marks the search finished
        print(summary_text(result), flush=True)
        if edit is None:
            raise NoEditError(_no_edit_reason(result), result)
        return result


# ----------------------------------------------------------------------------------------------------------------
# the search's folder: a finished search is refused, an interrupted one resumed
# ----------------------------------------------------------------------------------------------------------------
SETTING_OPTIONS = {"task": "--task", "methods": "--methods", "ball": "--ball", "model": "--model",
                   "holdout": "--holdout", "explore": "--explore", "epochs": "--epochs", "patience": "--patience",
                   "args": "--args", "loss": "--loss", "threshold": "--threshold", "evaluation": "--evaluation",
                   "hard_negatives": "--hard_negatives", "seed": "--seed",
                   "selection": "--selection"}
"""The settings that decide which trials a search draws (the budget does not): a resumed search must repeat them."""


def _file_or_name(value: str | None) -> str | None:
    return None if value is None else str(Path(value).resolve()) if Path(value).is_file() else value


def _search_settings(task: str, methods: list[str], key: str, model: str, holdout: float, explore: int,
                     epochs: int | None, patience: int | None, args: str | None, loss: str,
                     threshold: float | None, evaluation: str | None, hard_negatives: str | None,
                     seed: int) -> dict:
    return {"task": _file_or_name(task), "methods": list(methods), "ball": key, "model": model,
            "holdout": float(holdout), "explore": explore, "epochs": epochs, "patience": patience,
            "args": split_args(args), "loss": loss, "threshold": threshold, "evaluation": _file_or_name(evaluation),
            "hard_negatives": _file_or_name(hard_negatives), "seed": seed}


def _claim_folder(folder: Path, settings: dict, overwrite: bool) -> list[Trial]:
    """Check the search's folder and return the finished trials of an interrupted search in it (none otherwise).

    A finished search (``auto.json``) is refused without ``overwrite``; an interrupted one (``PROGRESS_FILE``, no
    ``auto.json``) is resumed when its settings are these; ``overwrite`` empties the folder and starts afresh.
    """
    if not folder.exists() or not any(folder.iterdir()):
        return []
    finished, progress = folder / AUTO_FILE, folder / PROGRESS_FILE
    if overwrite:
        for child in folder.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        return []
    if finished.exists():
        raise ResultsExistError(f"{finished} already exists: a finished search is never overwritten silently. Choose "
                                "another --output_dir, or pass --overwrite true to search again from scratch")
    if not progress.is_file():
        raise ResultsExistError(f"{folder} already exists and holds no editing auto search (no {AUTO_FILE} or "
                                f"{PROGRESS_FILE}): choose another --output_dir, or pass --overwrite true to empty it")
    try:
        saved = json.loads(progress.read_text(encoding="utf-8"))
        before, trials = saved["settings"], [_trial_of(t) for t in saved["trials"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{progress}: the record of the interrupted search cannot be read ({err}); pass --overwrite "
                          "true to start the search again, or choose another --output_dir") from None
    changed = [f"{SETTING_OPTIONS.get(k, k)} {before.get(k)!r} then, {settings[k]!r} now"
               for k in settings if before.get(k) != settings[k]]
    if changed:
        raise ConfigError(f"{folder} holds an interrupted search with other settings ({'; '.join(changed)}): give the "
                          "same settings to resume it (the budget may change), pass --overwrite true to start it "
                          "again, or choose another --output_dir")
    return trials


def _trial_of(record: dict) -> Trial:
    trial = Trial(**record)
    for name in ("seconds", "reliability", "reliability_mean_score", "generalization", "generalization_mean_score",
                 "locality", "degradation", "objective"):
        value = getattr(trial, name)
        if isinstance(value, str):  # write_json spells non-finite floats as strings
            setattr(trial, name, float(value))
    return trial


def _kept_trial(saved: Trial, number: int, method: str, params: dict, phase: str, folder: Path) -> Trial:
    if (saved.number, saved.method, saved.params) != (number, method, params):
        raise ConfigError(f"{folder / PROGRESS_FILE}: trial {number} of the interrupted search was "
                          f"{saved.method} {_params_text(saved.params)}, but this search draws {method} "
                          f"{_params_text(params)} (the code changed since); pass --overwrite true to start the "
                          "search again, or choose another --output_dir")
    saved.phase = phase
    return saved


def _set_aside(path: Path) -> None:
    """Move the files of an interrupted fit aside (``<name>.interrupted-<time>``): kept, out of the new fit's way."""
    if path.exists():
        aside = path.with_name(f"{path.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{path.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        path.rename(aside)
        print(f"{path.name}: the files of its interrupted fit were moved to {aside}", flush=True)


def _drop_training_generalization(trial: Trial) -> None:
    """A fit whose evaluation set is its canonical file measured training-set success, not generalization: it is not
    reported as such (nor counted twice in the objective)."""
    trial.generalization = trial.generalization_mean_score = None
    if trial.objective is not None:
        trial.objective = trial.reliability or 0.0


class NoEditError(EditingError):
    """``editing auto`` ended without the edit it was asked for (its record, ``auto.json``, is written).

    Attributes:
        result: the search's outcome.
    """

    def __init__(self, message: str, result: AutoResult) -> None:
        super().__init__(message)
        self.result = result


def _no_edit_reason(result: AutoResult) -> str:
    record = Path(result.folder) / AUTO_FILE
    final = result.final
    if final is None and not result.trials:
        minutes = result.budget.get("minutes")
        reason = (f"no trial could start within the budget of {minutes:g} minutes (a trial needs at least "
                  f"{MIN_TRIAL_SECONDS:.0f}s), so there is no edit; give a larger --minutes")
    elif final is None and result.trials and all(t.status == "killed" for t in result.trials):
        reason = ("every trial was killed at the deadline before it had evaluated an edited epoch, so there is no "
                  "edit; give a larger --minutes, or a smaller evaluation (--args \"--data.general_limit N\")")
    elif final is None:
        reason = (f"no trial finished, so there is no edit; see the trials' fit.log under {result.folder} (the first "
                  "error is usually the same in every trial), fix it and run the command again")
    elif not final.ok:
        reason = (f"the final fit failed ({final.error}), so there is no edit; fix what its fit.log says and run the "
                  "command again: the finished trials are kept in the record")
    else:
        reason = (f"no edited epoch stayed inside the {result.ball} ball, so there is no edit; give a larger budget "
                  "(--trials, --minutes), a larger --ball, or more --methods")
    return f"editing auto: {reason} ({record})"



def _fit_args(method: str, task: str, split: str, model: str, out: Path, params: dict, fixed: list[str],
              max_seconds: float | None, save_edits: bool = True, max_epoch: dict[str, int] | None = None) -> list[str]:
    from editing.protocol.trials import FitSettings

    extra = () if max_seconds is None else ("--trainer.max_time", _max_time(max_seconds))
    return FitSettings(config=FIT_DIR / f"{method}.yaml", task=task, model=model, output_dir=out, fixed=tuple(fixed),
                       params=params, split=split, max_epoch=max_epoch, save_edits=save_edits, extra=extra).args()


def _run(trial: Trial, args: list[str], runner, deadline: float | None, key: str, clock) -> None:
    begin = clock()
    code = runner(args, Path(trial.folder) / "fit.log", deadline)
    trial.seconds = round(clock() - begin, 1)
    if code != 0 or not (Path(trial.folder) / RESULTS_FILE).is_file():
        trial.status = "killed" if code == -9 else "failed"
        trial.error = f"editing fit exited with {code}; see {Path(trial.folder) / 'fit.log'}"
        if (Path(trial.folder) / PARTIAL_DIR / RESULTS_FILE).is_file():
            # what the fit wrote after its last evaluated epoch: the edit it had found is not lost with it
            error = trial.error
            try:
                trial.read_results(key, partial=True)
                trial.error = f"{error}; its record after epoch {trial.last_epoch} is used"
            except (RecordError, KeyError):
                pass
        return
    try:
        trial.read_results(key)
    except (RecordError, KeyError) as err:
        trial.status, trial.error = "failed", f"unreadable results: {err}"


def _best(done: list[Trial]) -> Trial | None:
    finished = [t for t in done if t.ok and t.objective is not None]
    return max(finished, key=Trial.key) if finished else None


def _keep_best_edit(done: list[Trial], key: str) -> None:
    """Only the best trial's edit is kept (a full-finetuning edit is the size of the model)."""
    best = _best(done)
    for t in done:
        if best is None or t.number != best.number:
            shutil.rmtree(Path(t.folder) / "edits", ignore_errors=True)
            shutil.rmtree(Path(t.folder) / PARTIAL_DIR / "edits", ignore_errors=True)


def _budget_text(trials: int | None, minutes: float | None) -> str:
    parts = ([f"{trials} trials"] if trials is not None else []) + ([f"{minutes:g} minutes"] if minutes else [])
    return " and ".join(parts)


def context_prefixes(args: list[str]) -> int:
    """The ``--data.context_prefixes N`` among a fit's ``--args`` (0 when absent): each canonical example is then
    trained on N + 1 times an epoch (behind each prefix and bare), so the small-data rule counts N + 1 batches per
    example.

    Raises:
        ConfigError: N is not a whole number of at least 0.
    """
    flag = "--data.context_prefixes"
    found = None
    for i, arg in enumerate(args):
        if arg == flag:
            found = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(flag + "="):
            found = arg.partition("=")[2]
    if found is None:
        return 0
    try:
        value = int(found)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"--args: {flag} {found!r} is not a whole number of prefixes; give e.g. {flag} 4")
    return value


def _plan_text(plan: Plan, small: SmallData) -> str:
    if plan.selection_prompts:
        data = (f"selection on held-out evaluation prompts ({plan.selection}): trials train on all "
                f"{plan.train_examples} canonical examples and are scored on {len(plan.selection_prompts)} prompts "
                f"(lines {[i + 1 for i in plan.selection_prompts]} of the evaluation file); the final fit is "
                f"reported on the other {plan.report_prompts}, never seen by the search")
    elif plan.holdout:
        data = (f"no validation pair: {len(plan.holdout)} of {plan.final_examples} canonical examples held out "
                f"(indices {plan.holdout}); trials train on {plan.train_examples}, the final fit on all "
                f"{plan.final_examples}")
    elif plan.retrain:
        data = (f"trials on the validation pair ({plan.train_examples} canonical examples), the final fit on the "
                f"test pair ({plan.final_examples})")
    else:
        data = (f"no hold-out: trials train on all {plan.train_examples} canonical examples and are scored on the "
                "task's evaluation set (its numbers are then optimistic)")
    per_epoch = f"{small.examples} examples"
    if small.examples != plan.train_examples:
        per_epoch = (f"{small.examples} training sequences ({plan.train_examples} canonical examples, each behind "
                     "its context prefixes and bare)")
    return (f"{data}\nsmall-data defaults for {per_epoch}: accumulation {small.accumulate} "
            f"({small.steps_per_epoch} optimizer steps per epoch), {small.max_epochs} epochs")


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


NOT_MEASURED = "not measured (the evaluation set is the canonical examples: give --evaluation FILE)"
"""What is printed for generalization when a fit's evaluation set is its own canonical file."""


def _trial_line(t: Trial, measured: bool = True) -> str:
    label = "final" if t.number < 0 else f"trial {t.number}"
    head = f"{label} [{t.method}, {t.phase}] {_params_text(t.params)}: "
    if not t.ok:
        return head + f"{t.status} ({t.error})"
    generalization = _rate(t.generalization) if measured else NOT_MEASURED
    return (head + f"epoch {t.epoch} of {t.last_epoch}, reliability {_rate(t.reliability)}, generalization "
            f"{generalization}, locality {_rate(t.locality)}, degradation {t.degradation:+.2e}, "
            f"{t.seconds:.0f}s")


def _params_text(params: dict) -> str:
    return " ".join(f"{k.rsplit('.', 2)[-2]}.{k.rsplit('.', 1)[-1]}={value_text(_round(v))}" for k, v in params.items())


def _round(value: Any) -> Any:
    return float(f"{value:.3g}") if isinstance(value, float) else value


def summary_text(result: AutoResult) -> str:
    """The closing summary: the chosen method and configuration, and the final edit's numbers."""
    if result.final is None:
        return f"editing auto: no edit found in {result.seconds:.0f}s ({result.folder})"
    f = result.final
    if not f.ok:
        return (f"editing auto: the final fit of {f.method} {_params_text(f.params)} {f.status} ({f.error}): no edit "
                f"({len(result.trials)} trials, {result.seconds:.0f}s; record: {Path(result.folder) / AUTO_FILE})")
    # a trial's edit (no final fit) was scored on the search's evaluation set (the held-out examples)
    measured = result.plan.get("search_generalization_measured", True) if f.number >= 0 and result.plan.get(
        "retrain") else result.plan["generalization_measured"]
    generalization = _rate(f.generalization) if measured else NOT_MEASURED
    rows = [["reliability (canonical examples)", _rate(f.reliability), _score(f.reliability_mean_score)],
            ["generalization (evaluation set)", generalization, _score(f.generalization_mean_score)],
            ["locality (hard negatives preserved)", _rate(f.locality), ""],
            ["degradation (general NLL)", "-" if f.degradation is None else f"{f.degradation:+.2e}",
             f"ball {result.ball}"]]
    table = markdown_table(["", "rate", "mean score"], rows)
    lines = [f"best edit inside the {result.ball} ball: {f.method}, epoch {f.epoch} "
             f"({len(result.trials)} trials, {result.seconds:.0f}s)",
             f"configuration: {_params_text(result.config.get('params', {}))} "
             f"{' '.join(result.config.get('fit_args', []))}".rstrip(),
             table,
             f"edit: {result.edit or 'none (no edited epoch stayed inside the ball)'}",
             *([f"note: {result.note}"] if result.note else []),
             f"record: {Path(result.folder) / AUTO_FILE}"]
    return "\n".join(lines)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


__all__ = ["AUTO_FILE", "PROGRESS_FILE", "AutoResult", "NoEditError", "Plan", "SmallData", "Trial", "auto_edit",
           "explore_draw", "explore_orders", "narrowed_draw", "plan_data", "summary_text", "trains_by_gradient"]

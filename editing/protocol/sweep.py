"""The sweep (SPEC section 6): random search on the validation pair as one optuna study per (task, model, method),
run by any number of workers that share its trial budget, and its progress.

Each trial is one ``editing fit`` in a subprocess (``editing.protocol.trials``) with the base fit config plus the
sampled overrides (``editing.protocol.space``); its outcome is the ``results.json`` the DegradationBudget callback
writes, copied into the trial's user attributes so that selection (``editing.protocol.select``) needs only the
database (``editing.protocol.storage``). Folder layout under ``<root>/<study>/``::

    study.db                    the study (default storage; any SQLAlchemy URL works instead)
    base.yaml                   the base fit config the trials ran with
    trial_<n>/results.json      one fit per trial (its log in fit.log)
    selection.json, trials.jsonl    written by ``select`` (editing.protocol.select)
    test/trial_<n>/seed_<s>/results.json    written by ``test-runs`` (editing.protocol.test_runs)
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.core import interruption
from editing.core.errors import ConfigError, EditingError
from editing.core.files import write_text
from editing.core.paths import FIT_DIR
from editing.core.textfiles import read_text
from editing.protocol import trials
from editing.protocol.select import select_best, trial_record
from editing.protocol.space import Parameter, load_space, parse_space, space_dict
from editing.protocol.storage import (
    DEFAULT_ROOT,
    default_storage,
    make_storage,
    open_existing_study,
    open_study,
    retry_callback,
    study_name_for,
)
from editing.protocol.trials import (
    DropTrialErrors,
    FitSettings,
    TrialError,
    consumes_budget,
    fit_log_error,
    is_finished,
    split_args,
)
from editing.rules.budget import key_eps
from editing.runs.records import RESULTS_FILE, RunRecord, TrialRecord
from editing.runs.tables import best_table


class SweepFailedError(EditingError, RuntimeError):
    """Every trial of a study failed: the message gives the first one's error, from its ``fit.log``."""


@dataclass
class SweepDefinition:
    """What every worker of a study must agree on; stored in the study, checked when a worker joins."""

    task: str
    model: str
    method: str
    base_config: str  # the base fit config's text (stored, so that workers on other machines need no same path)
    space: dict[str, dict]
    args: list[str] = field(default_factory=list)
    seed: int = 0

    def parameters(self) -> dict[str, Parameter]:
        """The parsed search space."""
        return parse_space(self.space)

    def fit_settings(self, base_path: Path, output_dir: Path, **settings: Any) -> FitSettings:
        """The settings of one of the sweep's fits: its base config, task, model and fixed arguments, plus
        ``settings`` (see ``FitSettings``)."""
        return FitSettings(config=base_path, task=self.task, model=self.model, output_dir=output_dir,
                           fixed=tuple(self.args), **settings)

    def to_dict(self) -> dict:
        """JSON form."""
        return {"task": self.task, "model": self.model, "method": self.method, "base_config": self.base_config,
                "space": self.space, "args": list(self.args), "seed": self.seed}


def make_definition(task: str, method: str, model: str = "smollm2-135m", base_config: str | None = None,
                    space: Sequence[str] | str | None = None, params: dict | None = None,
                    args: Sequence[str] | None = None, seed: int = 0) -> SweepDefinition:
    """Build a sweep definition from command-line settings (see ``run_sweep``)."""
    if base_config is None:
        # one fit config per method, for any task (the task comes from --data.task, see SweepDefinition.fit_args)
        path = FIT_DIR / f"{method}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in FIT_DIR.glob("*.yaml"))
            raise ConfigError(f"no base fit config {path} for method {method!r} (there are: {', '.join(known)}); "
                              "pass --base_config FILE")
    else:
        path = Path(base_config)
        if not path.is_file():
            raise ConfigError(f"base_config {path} does not exist")
    parsed = load_space(method, space, params)
    return SweepDefinition(task=task, model=model, method=method, base_config=read_text(path),
                           space=space_dict(parsed), args=list(args or []), seed=seed)


def make_objective(definition: SweepDefinition, sweep_dir: Path, n_trials: int,
                   runner: Callable[[list[str], Path], int] | None = None) -> Callable:
    """The optuna objective: one ``editing fit`` per trial (``runner``, default ``trials.run_fit`` looked up at
    call time); returns the gain in the strictest ball."""
    import optuna

    space = definition.parameters()
    base_path = sweep_dir / "base.yaml"

    ran: list[int] = []

    def objective(trial) -> float:
        # the global budget: a trial goes ahead only when fewer than n_trials budget-consuming trials precede it,
        # so workers asking at the same moment never run more than n_trials fits in all
        study_trials = trial.study.get_trials(deepcopy=False)
        earlier = [t for t in study_trials if t.number < trial.number and consumes_budget(t)]
        if len(earlier) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study's trial budget is used up")
        params = {key: p.suggest(trial) for key, p in space.items()}
        out = sweep_dir / f"trial_{trial.number}"
        trial.set_user_attr("dir", str(out))
        trial.set_user_attr("host", socket.gethostname())
        retry_of = study_trials[trial.number].system_attrs.get("failed_trial")
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        settings = definition.fit_settings(base_path, out, params=params, save_edits=False)
        start = time.time()
        ran.append(trial.number)
        code = (runner or trials.run_fit)(settings.args(), out / "fit.log")
        trial.set_user_attr("seconds", round(time.time() - start, 1))
        results_path = out / RESULTS_FILE
        if code != 0 or not results_path.is_file():
            trial.set_user_attr("error", f"editing fit exited with {code}: {fit_log_error(out / 'fit.log')} "
                                         f"(see {out / 'fit.log'})")
            raise TrialError(trial.user_attrs.get("error", f"exit {code}"))
        outcome = TrialRecord.of_run(RunRecord.read(results_path), trial.number, params)
        trial.set_user_attr("results", str(results_path))
        for key, value in outcome.outcome().items():
            trial.set_user_attr(key, value)
        strictest = min(outcome.balls, key=key_eps)
        return float(outcome.balls[strictest].success_change_pp)

    objective.ran = ran  # the trials this worker ran a fit for
    return objective


def run_worker(study, definition: SweepDefinition, sweep_dir: Path, n_trials: int, poll: float = 5.0,
               runner: Callable[[list[str], Path], int] | None = None, log: Callable[[str], None] = print) -> int:
    """Run trials of ``study`` until it holds ``n_trials`` finished ones (complete, or failed by an error).

    Workers wait while the remaining budget is held by trials running elsewhere: if such a worker dies, its trial
    is failed once its heartbeat is stale and re-queued, and a waiting worker takes it over.

    Returns:
        The number of trials this worker ran.
    """
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    sweep_dir.mkdir(parents=True, exist_ok=True)
    base = sweep_dir / "base.yaml"
    if not base.is_file() or base.read_text() != definition.base_config:
        write_text(base, definition.base_config, overwrite=True)
    objective = make_objective(definition, sweep_dir, n_trials, runner)
    optuna_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, DropTrialErrors) for f in optuna_log.filters):
        optuna_log.addFilter(DropTrialErrors())
    while True:
        with warnings.catch_warnings():  # experimental since optuna 2.9, the public way to reap dead trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(is_finished(t) for t in trials)
        if done >= n_trials:
            log(f"study {study.study_name}: {done} trials finished; this worker ran {len(objective.ran)}")
            _refuse_all_failed(study.study_name, trials)
            return len(objective.ran)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if waiting == 0 and sum(consumes_budget(t) for t in trials) >= n_trials:
            time.sleep(poll)  # the rest of the budget is running in other workers
            continue
        before = len(objective.ran)
        try:
            study.optimize(objective, n_trials=1, catch=(TrialError,))
        except KeyboardInterrupt:
            _requeue_interrupted(study, objective.ran[-1:])
            raise
        if len(objective.ran) > before:
            t = study.get_trials(deepcopy=False)[objective.ran[-1]]
            failed = f" ({t.user_attrs['error']})" if t.state == TrialState.FAIL and "error" in t.user_attrs else ""
            log(f"trial {t.number}: {t.state.name} value={t.value} {t.params}{failed}")


def _refuse_all_failed(name: str, trials: list) -> None:
    """A study whose finished trials all failed has nothing to select: say why (the first trial's error)."""
    from optuna.trial import TrialState

    if any(t.state == TrialState.COMPLETE for t in trials):
        return
    failed = sorted((t for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs),
                    key=lambda t: t.number)
    if failed:
        first = failed[0]
        raise SweepFailedError(f"all {len(failed)} trials failed in study {name}; the first, trial {first.number}: "
                               f"{first.user_attrs['error']}. Fix that and run the sweep again under another "
                               "--study_name (or remove the study folder)")


def _requeue_interrupted(study, numbers: list[int]) -> None:
    """Ctrl-C in a worker: optuna fails its trial; queue the configuration again, as for a killed worker."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    for number in numbers:
        t = trials[number]
        if t.state == TrialState.FAIL and "error" not in t.user_attrs:
            retry_callback()(study, t)


def run_sweep(task: str = "country_capital", method: str = "lora", model: str = "smollm2-135m",
              n_trials: int = 25, base_config: str | None = None, space: list[str] | str | None = None,
              params: dict[str, dict] | None = None, args: str | None = None, root: str = DEFAULT_ROOT,
              study_name: str | None = None, storage: str | None = None, seed: int = 0,
              heartbeat_interval: int = 60, grace_period: int | None = None, poll: float = 10.0) -> int:
    """Random search on the validation pair: join (or create) a study and run trials until it holds ``n_trials``.

    Start the same command on as many processes or machines as wanted; they share the trial budget. A killed
    worker's trial is failed after ``grace_period`` and its configuration re-queued; restart the worker (or let the
    others finish). Progress: ``editing sweep-status``.

    Args:
        task: task name (or task YAML).
        method: method name; its search space is ``lightning_configs/sweeps/<method>.yaml``.
        model: model name (``--model.init_args.base.name`` of the trials).
        n_trials: trials of the whole study (all workers together).
        base_config: the fit config the trials start from (default ``lightning_configs/fit/<method>.yaml``, for any
            task: built-in or a task YAML of your own).
        space: search-space YAML(s) replacing the default one: one path, or a list whose later files override
            earlier ones key by key.
        params: extra search-space entries, e.g. ``{"model.init_args.lora.rank": {"int_uniform": [1, 16]}}``.
        args: fixed ``editing fit`` arguments for every trial (and its test runs), one string split like a shell
            command line, e.g. ``"--data.eval_limit 50 --trainer.max_epochs 3"``.
        root: sweep folders go to ``<root>/<study_name>/``.
        study_name: default ``<task>-<model>-<method>``.
        storage: SQLAlchemy URL of the study (default: ``sqlite:///<root>/<study_name>/study.db``); use PostgreSQL
            for workers on several machines.
        seed: seed of the random search (draws depend on it and the trial number only).
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without heartbeat before a trial is failed and re-queued (default 3 x interval).
        poll: seconds between looks at the study while the rest of the budget runs elsewhere.

    Returns:
        The number of trials this worker ran.
    """
    definition = make_definition(task, method, model, base_config, space, params, split_args(args), seed)
    name = study_name or study_name_for(task, model, method)
    sweep_dir = Path(root) / name
    url = storage or default_storage(root, name)
    study = open_study(make_storage(url, heartbeat_interval, grace_period), name, definition)
    print(f"sweep {name}: {n_trials} trials, storage {url}, trial folders {sweep_dir}/trial_<n>", flush=True)
    interruption.keep(f"the finished trials of study {name} are kept in {sweep_dir} (storage {url}), a trial "
                      "stopped midway is queued again")
    return run_worker(study, definition, sweep_dir.resolve(), n_trials, poll=poll,
                      log=lambda m: print(m, flush=True))


# ----------------------------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------------------------
def study_status(study) -> dict:
    """Counts of trials by state, and the best complete trial so far per ball."""
    trials = study.get_trials(deepcopy=False)
    counts = {"complete": 0, "running": 0, "waiting": 0, "failed": 0, "retried": 0, "surplus": 0}
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    for t in trials:
        state = t.state.name
        if state == "COMPLETE":
            counts["complete"] += 1
        elif state == "RUNNING":
            counts["running"] += 1
        elif state == "WAITING":
            counts["waiting"] += 1
        elif state == "PRUNED" and t.user_attrs.get("surplus"):
            counts["surplus"] += 1
        elif state == "FAIL":
            counts["retried" if t.number in retried else "failed"] += 1
    records = [trial_record(t) for t in trials if t.state.name == "COMPLETE" and "balls" in t.user_attrs]
    clock = dt.datetime.now()
    running = [{"trial": t.number, "host": t.user_attrs.get("host"),
                "seconds": round((clock - t.datetime_start).total_seconds()) if t.datetime_start else None}
               for t in trials if t.state.name == "RUNNING"]
    return {"study": study.study_name, "counts": counts, "running": running, "best": select_best(records)}


def format_status(status: dict) -> str:
    """Human-readable progress of a sweep."""
    c = status["counts"]
    lines = [f"study {status['study']}: {c['complete']} complete, {c['running']} running, {c['waiting']} queued, "
             f"{c['failed']} failed, {c['retried']} failed and re-queued (worker died)"
             + (f", {c['surplus']} surplus (pruned unrun)" if c["surplus"] else "")]
    for r in status.get("running", []):
        lines.append(f"  running: trial {r['trial']} on {r['host']}, for {r['seconds']}s")
    if status["best"]:
        lines.append(best_table(status["best"]))
    return "\n".join(lines)


def sweep_status(study_name: str, root: str = DEFAULT_ROOT, storage: str | None = None,
                 watch: float | None = None) -> dict:
    """Print a sweep's progress: trials done, running, failed, and the best configuration so far per ball.

    Args:
        study_name: the study.
        root: the sweep root (for the default SQLite storage).
        storage: the study's SQLAlchemy URL.
        watch: reprint every this many seconds until the study has no running or queued trial.
    """
    study = open_existing_study(study_name, root, storage)
    while True:
        status = study_status(study)
        print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] " + format_status(status), flush=True)
        if not watch or (status["counts"]["running"] == 0 and status["counts"]["waiting"] == 0):
            return status
        time.sleep(watch)

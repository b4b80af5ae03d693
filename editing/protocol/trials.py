"""The subprocess trial runner: one ``editing fit`` of the protocol (a sweep's trial, a test run, a step of ``editing
auto``) spelled as a command line and run in a child process, so that a crash, a kill or a leak stays inside it; and
how a finished fit's failure reads from its log."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.core.interruption import SOFT_STOP
from editing.core.paths import REPO_DIR
from editing.rules.budget import MAX_EPOCH_SETTING
from editing.runs.tables import value_text

# Arguments every trial and test run gets: no CSV logs or checkpoints (a sweep runs thousands of fits; the results
# file is the outcome), no progress bars in the logs. A logger the sweep's arguments name is kept (names_a_logger).
HOUSEKEEPING = ("--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--checkpoint.save_top_k", "0",
                "--checkpoint.save_last", "false")


def names_a_logger(args: Sequence[str]) -> bool:
    """Whether ``editing fit`` arguments set a logger: a ``--trainer.logger`` option, or a ``--config`` file whose
    ``trainer.logger`` is set (unreadable files are left to the fit to report)."""
    import yaml

    for i, arg in enumerate(args):
        if arg == "--trainer.logger" or arg.startswith(("--trainer.logger=", "--trainer.logger.")):
            return True
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else \
            args[i + 1] if arg == "--config" and i + 1 < len(args) else None
        if path is None:
            continue
        try:
            config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if isinstance(trainer, dict) and trainer.get("logger") not in (None, False):
            return True
    return False


def split_args(args: str | Sequence[str] | None) -> list[str]:
    """Command-line arguments given as one string (split like a shell does) or already as a list."""
    if args is None:
        return []
    return shlex.split(args) if isinstance(args, str) else [str(a) for a in args]


PAPER_PROTOCOL = ("--small_data", "false", "--budget.general_sample", "all")
"""What a sweep's trial and a test run pass so that a task of one's own keeps the paper's settings: no small-data
rule (``editing.commands.practitioner``) and every text of G (``--budget.general_sample``)."""


def overrides(params: Mapping[str, Any]) -> list[str]:
    """``editing fit`` arguments setting the sampled values."""
    args: list[str] = []
    for key, value in params.items():
        args += [f"--{key}", value_text(value)]
    return args


@dataclass(frozen=True)
class FitSettings:
    """The settings of one ``editing fit`` the protocol runs (a trial or a test run); ``args`` spells them as the
    command's options, the one place the sweep writes them.

    Args:
        config: the base fit config (the sweep's ``base.yaml``).
        task: task name or task YAML.
        model: the base model's name.
        output_dir: the run folder (results, and the trainer's root folder).
        fixed: the sweep's own ``editing fit`` arguments (``editing sweep --args``), shared by its trials and test
            runs.
        params: the sampled values, dotted ``editing fit`` key -> value.
        split: the data split (None: the config's, i.e. validation).
        seed: the seed of the run and of its data order (None: the config's).
        max_epoch: per ball key, the epoch not to go past (test runs: the epoch chosen at validation).
        save_edits: whether the run writes its edits (None: the callback's default).
        extra: more arguments, last so that they win (``editing test-runs --args``).
        housekeeping: no loggers, checkpoints, progress bars or model summary (``HOUSEKEEPING``).
    """

    config: Path
    task: str
    model: str
    output_dir: Path
    fixed: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    split: str | None = None
    seed: int | None = None
    max_epoch: Mapping[str, int] | None = None
    save_edits: bool | None = None
    extra: tuple[str, ...] = ()
    housekeeping: bool = True

    def args(self) -> list[str]:
        """The ``editing fit`` command line (without ``fit``); later arguments override earlier ones."""
        # the paper's protocol: its config's accumulation and epochs, and all of G every epoch (issue 36 item 6)
        args = ["--config", str(self.config), "--data.task", self.task, "--model.init_args.base.name", self.model,
                *PAPER_PROTOCOL, *self.fixed, *overrides(self.params)]
        if self.split is not None:
            args += ["--data.split", self.split]
        if self.seed is not None:
            args += ["--seed_everything", str(self.seed), "--data.seed", str(self.seed)]
        if self.max_epoch is not None:
            args += [MAX_EPOCH_SETTING, json.dumps(dict(self.max_epoch))]
        if self.housekeeping:
            # a logger the sweep's own arguments name (e.g. --config lightning_configs/loggers/tensorboard.yaml)
            # is kept: a user who asks for trial logs gets them
            args += HOUSEKEEPING[2:] if names_a_logger([*self.fixed, *self.extra]) else HOUSEKEEPING
        args += ["--trainer.default_root_dir", str(self.output_dir), "--budget.output_dir", str(self.output_dir)]
        if self.save_edits is not None:
            args += ["--budget.save_edits", value_text(self.save_edits)]
        return [*args, *self.extra]


class TrialError(RuntimeError):
    """A trial's fit failed (non-zero exit); the trial is recorded FAIL and counts as done."""


class DropTrialErrors(logging.Filter):
    """Optuna logs a failed trial's error with its traceback, then its value (None): the worker prints the trial's
    error line instead, and an interrupted worker the one line of ``editing.core.interruption``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (TrialError, KeyboardInterrupt)):
            return False
        return not re.fullmatch(r"Trial \d+ failed with value None\.", str(record.getMessage()))


_ERROR_LINE = re.compile(r"^(error: |interrupted by |([A-Za-z_][\w.]*)?(Error|Exception|Interrupt)\b)")


def fit_log_error(path: Path, limit: int = 400) -> str:
    """The reason a fit failed, from its log: its last ``error: ...`` line (the command's own message), else the last
    line of a traceback, else the log's last line (cut to ``limit`` characters)."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as err:
        return f"its log {path} cannot be read ({err.strerror or err})"
    lines = [line for line in lines if line and not line.startswith("$ editing fit")]
    found = [line for line in lines if _ERROR_LINE.match(line)]
    line = (found or lines or ["(the log is empty)"])[-1]
    line = line[len("error: "):] if line.startswith("error: ") else line
    return line if len(line) <= limit else line[:limit - 4] + " ..."


def _die_with_parent() -> None:
    # Linux: the fit subprocess gets SIGKILL when its worker dies, so a killed worker leaves no orphan fit behind.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _start_fit() -> None:
    # The soft stop's default action is to end the process: until the fit's CLI records it (interruption.install),
    # it is ignored (an ignored signal stays ignored across exec), and run_fit sends it again each second.
    signal.signal(SOFT_STOP, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        _die_with_parent()


def run_fit(args: Sequence[str], log_path: Path, env: dict | None = None, deadline: float | None = None,
            clock: Callable[[], float] = time.monotonic, soft_deadline: float | None = None) -> int:
    """Run ``editing fit <args>`` in a subprocess with the same code as this process; output goes to ``log_path``.

    Args:
        args: the fit's command line (after ``fit``).
        log_path: the log file (appended to).
        env: the environment (default: this process's).
        deadline: a ``clock`` time at which the fit is killed (None: never): the last resort of ``editing auto``'s
            time budget, whose trials keep what they wrote by then (their partial record).
        clock: the clock ``deadline`` and ``soft_deadline`` are read on.
        soft_deadline: a ``clock`` time from which the fit is asked (``interruption.SOFT_STOP``, sent each second
            until it ends) to stop at its next epoch boundary and write its results (None: never); a trial's share.

    Returns:
        The exit code (-9 when killed at the deadline).
    """
    env = dict(os.environ if env is None else env)
    # the subprocess must import this checkout's package, not another installed copy
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed = deadline is not None or soft_deadline is not None
    asked = False
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ editing fit {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "editing.cli", "fit", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, preexec_fn=_start_fit)
        try:
            while True:
                try:
                    return proc.wait(timeout=1.0 if timed else None)
                except subprocess.TimeoutExpired:
                    now = clock()
                    if deadline is not None and now >= deadline:
                        proc.kill()
                        proc.wait()
                        log.write("\n[editing auto: killed at the budget's deadline]\n")
                        return -9
                    if soft_deadline is not None and now >= soft_deadline:
                        if not asked:
                            log.write("\n[editing auto: the trial's time share ended: asked to stop at the next "
                                      "epoch boundary]\n")
                            log.flush()
                            asked = True
                        proc.send_signal(SOFT_STOP)
        finally:
            if proc.poll() is None:  # interrupted: do not leave the fit running
                proc.kill()
                proc.wait()


def consumes_budget(trial) -> bool:
    """Whether a trial counts toward ``n_trials``: done, running or queued; a trial that failed because its worker
    died does not (its retry, a new WAITING trial, takes its place); a surplus trial (pruned unrun) does not."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def is_finished(trial) -> bool:
    """Whether a trial is over: complete, or failed by its fit's error (not by its worker dying)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)

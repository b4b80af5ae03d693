"""The paper's protocol at scale (SPEC section 6): random search on the validation pair, selection per ball, and
test runs with several seeds.

A sweep is one optuna study per (task, model, method). Each trial is one ``editing fit`` run in a subprocess (so a
crash, a kill or a leak stays inside the trial) with the base fit config plus the sampled overrides; its outcome is
the ``results.json`` the DegradationBudget callback writes, copied into the trial's user attributes so that
``select`` needs only the database. Folder layout under ``<root>/<study>/``::

    study.db                    the study (default storage; any SQLAlchemy URL works instead)
    base.yaml                   the base fit config the trials ran with
    trial_<n>/results.json      one fit per trial (its log in fit.log)
    selection.json, trials.jsonl    written by ``select``
    test/trial_<n>/seed_<s>/results.json    written by ``test-runs``
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing.core import interruption
from editing.core.errors import ConfigError, EditingError
from editing.core.files import ensure_writable, write_json, write_jsonl, write_text
from editing.core.paths import REPO_DIR
from editing.core.textfiles import load_yaml, read_text
from editing.rules.budget import MAX_EPOCH_SETTING, key_eps
from editing.runs.records import (
    RESULTS_FILE,
    SELECTION_FILE,
    TRIALS_FILE,
    RecordError,
    RunRecord,
    SelectedBall,
    Selection,
    TrialRecord,
    now,
)
from editing.runs.tables import best_table, selection_table, value_text

SPACE_DIR = REPO_DIR / "lightning_configs" / "sweeps"
FIT_DIR = REPO_DIR / "lightning_configs" / "fit"
DISTRIBUTIONS = ("log10_uniform", "uniform", "int_uniform", "categorical")
DEFAULT_ROOT = "runs/sweeps"

# Arguments every trial and test run gets: no CSV logs or checkpoints (a sweep runs thousands of fits; the results
# file is the outcome), no progress bars in the logs.
HOUSEKEEPING = ("--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false", "--checkpoint.save_top_k", "0",
                "--checkpoint.save_last", "false")


# ----------------------------------------------------------------------------------------------------------------
# search spaces
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parameter:
    """One searched setting: a dotted ``editing fit`` key and its distribution.

    Args:
        key: the CLI key, e.g. ``model.init_args.lora.rank``.
        kind: ``log10_uniform`` (10^U(low, high)), ``uniform``, ``int_uniform`` (U{low..high}) or ``categorical``.
        args: ``[low, high]``, or the choices of a categorical.
    """

    key: str
    kind: str
    args: tuple

    def suggest(self, trial) -> Any:
        """Draw the value for an optuna trial (10^U(low, high) is a log-uniform float between 10^low and 10^high)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.args))
        low, high = self.args
        if self.kind == "log10_uniform":
            return trial.suggest_float(self.key, 10.0 ** low, 10.0 ** high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, float(low), float(high))
        return trial.suggest_int(self.key, int(low), int(high))


def parse_space(spec: dict, source: str = "search space") -> dict[str, Parameter]:
    """Check and parse a search space mapping (the ``parameters`` of a sweep YAML).

    Args:
        spec: dotted key -> ``{distribution: args}``.
        source: where it came from, for messages.

    Returns:
        Key -> Parameter, in the file's order.
    """
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"{source}: `parameters` must map dotted `editing fit` keys to distributions")
    space = {}
    for key, dist in spec.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", key):
            raise ConfigError(f"{source}: {key!r} is not a dotted key such as model.init_args.optimizer.lr")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{source}: {key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, (list, tuple)) or not args:
            raise ConfigError(f"{source}: {key}: {kind} needs a list, got {args!r}")
        if kind != "categorical":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{source}: {key}: {kind} needs [low, high], got {args!r}")
            if args[0] > args[1] or (kind == "int_uniform" and not all(float(a).is_integer() for a in args)):
                raise ConfigError(f"{source}: {key}: bad bounds {args!r}")
        space[key] = Parameter(key, kind, tuple(args))
    return space


def load_space(method: str, files: Sequence[str] | str | None = None,
               params: dict | None = None) -> dict[str, Parameter]:
    """The search space of a method: ``lightning_configs/sweeps/<method>.yaml`` unless ``files`` are given; later
    files and then ``params`` override earlier entries key by key.

    Args:
        method: the method name (``lora``, ``full``, ... any method with a sweeps YAML).
        files: search-space YAMLs to use instead of the default one (one path or a list).
        params: extra entries, ``{key: {distribution: args}}``.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    paths = [Path(f) for f in files] if files else [SPACE_DIR / f"{method}.yaml"]
    merged: dict = {}
    for path in paths:
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
            raise ConfigError(f"no search space {path} (methods with one: {known}); write one, see "
                              f"lightning_configs/sweeps/lora.yaml")
        doc = load_yaml(path, "search space") or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("parameters") or {}, dict):
            raise ConfigError(f"{path}: a search space is a mapping with `parameters:` (dotted `editing fit` key -> "
                              "{distribution: args}); see lightning_configs/sweeps/lora.yaml")
        if doc.get("method") not in (None, method):
            raise ConfigError(f"{path} is the search space of method {doc['method']!r}, not {method!r}")
        merged.update(doc.get("parameters") or {})
    merged.update(params or {})
    return parse_space(merged, ", ".join(str(p) for p in paths))


def make_sampler(seed: int):
    """Random search whose draws depend only on (seed, trial number, key): a sweep samples the same configurations
    however many workers share it, and workers never draw identical ones by sharing a seed."""
    import numpy as np
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.samplers import BaseSampler

    class _Sampler(BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, param_name, param_distribution):
            digest = hashlib.sha256(f"{seed}/{trial.number}/{param_name}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            d = param_distribution
            if isinstance(d, CategoricalDistribution):
                return d.choices[int(rng.integers(len(d.choices)))]
            if isinstance(d, IntDistribution):
                return int(rng.integers(d.low, d.high + 1))
            if isinstance(d, FloatDistribution) and d.log:
                return float(math.exp(rng.uniform(math.log(d.low), math.log(d.high))))
            return float(rng.uniform(d.low, d.high))

    return _Sampler()


def split_args(args: str | Sequence[str] | None) -> list[str]:
    """Command-line arguments given as one string (split like a shell does) or already as a list."""
    if args is None:
        return []
    return shlex.split(args) if isinstance(args, str) else [str(a) for a in args]


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
        args = ["--config", str(self.config), "--data.task", self.task, "--model.init_args.base.name", self.model,
                *self.fixed, *overrides(self.params)]
        if self.split is not None:
            args += ["--data.split", self.split]
        if self.seed is not None:
            args += ["--seed_everything", str(self.seed), "--data.seed", str(self.seed)]
        if self.max_epoch is not None:
            args += [MAX_EPOCH_SETTING, json.dumps(dict(self.max_epoch))]
        if self.housekeeping:
            args += HOUSEKEEPING
        args += ["--trainer.default_root_dir", str(self.output_dir), "--budget.output_dir", str(self.output_dir)]
        if self.save_edits is not None:
            args += ["--budget.save_edits", value_text(self.save_edits)]
        return [*args, *self.extra]


# ----------------------------------------------------------------------------------------------------------------
# the sweep definition and its study
# ----------------------------------------------------------------------------------------------------------------
def study_name_for(task: str, model: str, method: str) -> str:
    """Default study name ``<task>-<model>-<method>`` (characters outside [\\w.-] become ``_``)."""
    return re.sub(r"[^\w.-]+", "_", f"{Path(task).stem}-{model}-{method}")


def default_storage(root: str | Path, study: str) -> str:
    """The SQLite file of a study under the sweep root."""
    return f"sqlite:///{(Path(root) / study / 'study.db').resolve()}"


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


def _space_dict(space: dict[str, Parameter]) -> dict[str, dict]:
    return {k: {p.kind: list(p.args)} for k, p in space.items()}


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
                           space=_space_dict(parsed), args=list(args or []), seed=seed)


STORAGE_EXAMPLES = ("e.g. sqlite:////abs/path/study.db or postgresql+psycopg2://user:password@host:5432/db, or leave "
                    "--storage out for the SQLite file under --root")
CONNECT_TIMEOUT = 10  # seconds: an unreachable database server is reported at once, not after minutes of retries


def check_storage_url(url: str):
    """Parse a ``--storage`` URL and check its database driver is installed, before anything connects.

    Args:
        url: a SQLAlchemy URL.

    Returns:
        The parsed ``sqlalchemy.engine.URL``.

    Raises:
        ConfigError: not a URL, an unknown database kind, a driver that is not installed, or an in-memory SQLite
            database (a sweep's trials would vanish with the process).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--storage {url!r} is not a database URL; {STORAGE_EXAMPLES}") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--storage {shown!r}: unknown database kind {parsed.drivername!r}; "
                          f"{STORAGE_EXAMPLES}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise ConfigError(f"--storage {shown!r}: the {parsed.drivername} driver is not installed ({err}); install it "
                          "(PostgreSQL: pip install -e '.[postgres]' and write postgresql+psycopg2://...)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"--storage {shown!r} is an in-memory database, which dies with the process; give a file, "
                          f"{STORAGE_EXAMPLES}")
    return parsed


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def _prepare_sqlite(url: str, create: bool = True) -> None:
    """Create the folder of a SQLite study and switch the file to WAL, so that readers do not block the writer of
    another worker (the setting is stored in the file; WAL needs a local filesystem, use PostgreSQL across
    machines). With ``create`` false a missing file is an error, and nothing is created."""
    path = _sqlite_path(url)
    if path is None:
        return
    if not create:
        if not path.is_file():
            raise ConfigError(f"--storage {url!r}: the database file {path} does not exist (check the path; a sweep "
                              "creates it)")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=60) as con:
            con.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"--storage {url!r}: cannot create or open the SQLite file {path} ({err}); choose a "
                          "writable place (--root or --storage)") from None


def _probe(url: str, engine_kwargs: dict) -> None:
    """Connect once, with a short timeout, so that a wrong host, port or password is reported at once."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        shown = engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"--storage {shown!r}: cannot connect to the database ({reason}); check the host, port, "
                          "user, password and database name, and that the server is running") from None
    finally:
        engine.dispose()


def _retry_callback():
    """Re-queues a dead worker's trial (same configuration) as a WAITING trial, at most 3 times."""
    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():  # "experimental" in optuna since 2.8; relied upon, as heartbeats (make_storage)
        warnings.simplefilter("ignore")
        return cls(max_retry=3)


def make_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None,
                 create: bool = True):
    """An optuna RDBStorage with heartbeats: a trial whose worker stops beating for ``grace_period`` seconds is
    marked FAIL and re-queued with the same configuration.

    The URL is checked first (``check_storage_url``) and the database connected to once with a
    ``CONNECT_TIMEOUT``-second timeout, so a bad URL or an unreachable server fails at once with a clear message.

    Args:
        url: SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg2://user:pw@host/db``).
        heartbeat_interval: seconds between heartbeats of a running trial (None: no heartbeats).
        grace_period: seconds without a heartbeat before a trial counts as dead (default 3 x interval).
        create: create a missing SQLite file (false for commands that only read a study).
    """
    import optuna
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, OperationalError

    parsed = check_storage_url(url)
    _prepare_sqlite(url, create)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
        if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb"):
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    _probe(url, engine_kwargs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict = {}
    if heartbeat_interval:
        kwargs = {"heartbeat_interval": heartbeat_interval,
                  "grace_period": grace_period or 3 * heartbeat_interval,
                  "heartbeat_stale_trial_callback": _retry_callback()}
    last: Exception | None = None
    for attempt in range(10):  # two workers creating the tables of a new database at once may collide: retry
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna since 2.9; we rely on them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (IntegrityError, OperationalError) as err:  # the collision; anything else fails at once below
            last = err
            time.sleep(0.5 + attempt)
        except Exception as err:  # noqa: BLE001 - reported with the URL, not as a SQLAlchemy traceback
            last = err
            break
    reason = str(getattr(last, "orig", None) or last).strip().splitlines()[0]
    raise ConfigError(f"--storage {parsed.render_as_string(hide_password=True)!r}: the optuna tables cannot be created "
                      f"or read ({type(last).__name__}: {reason}); check the user's rights on the database, or "
                      "use another database") from last


def open_study(storage, name: str, definition: SweepDefinition | None = None, seed: int = 0):
    """Create or join study ``name``; a joining worker's definition must equal the stored one.

    Args:
        storage: an optuna storage.
        name: the study name.
        definition: the sweep this worker runs (None: only read the study, which must exist).
        seed: the sampler seed (the definition's seed when given).
    """
    import optuna

    if definition is None:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            known = sorted(optuna.get_all_study_names(storage))
            raise ConfigError(f"no study {name!r} in this storage (its studies: {', '.join(known) or 'none'}); check "
                              "--study_name, or start the sweep with `editing sweep`") from None
        sweep = study.user_attrs.get("sweep") or {}
        study.sampler = make_sampler(sweep.get("seed", seed))
        return study
    last: Exception | None = None
    for attempt in range(10):
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        sampler=make_sampler(definition.seed), load_if_exists=True)
            break
        except Exception as err:  # noqa: BLE001 - concurrent creation of the same study: retry, then re-raise
            last = err
            time.sleep(0.5 + attempt)
    else:
        raise last  # type: ignore[misc]
    stored = study.user_attrs.get("sweep")
    mine = definition.to_dict()
    if stored is None:
        study.set_user_attr("sweep", mine)
        stored = mine
    if stored != mine:
        diff = sorted(k for k in mine if stored.get(k) != mine[k])
        raise ConfigError(f"study {name!r} was started with other settings ({', '.join(diff)} differ); join it "
                          f"with the same settings, or use another --study_name")
    return study


# ----------------------------------------------------------------------------------------------------------------
# trials
# ----------------------------------------------------------------------------------------------------------------
class TrialError(RuntimeError):
    """A trial's fit failed (non-zero exit); the trial is recorded FAIL and counts as done."""


class SweepFailedError(EditingError, RuntimeError):
    """Every trial of a study failed: the message gives the first one's error, from its ``fit.log``."""


class _DropTrialErrors(logging.Filter):
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


def run_fit(args: Sequence[str], log_path: Path, env: dict | None = None, deadline: float | None = None,
            clock: Callable[[], float] = time.monotonic) -> int:
    """Run ``editing fit <args>`` in a subprocess with the same code as this process; output goes to ``log_path``.

    Args:
        args: the fit's command line (after ``fit``).
        log_path: the log file (appended to).
        env: the environment (default: this process's).
        deadline: a ``clock`` time at which the fit is killed (None: never); ``editing auto``'s time budget.
        clock: the clock ``deadline`` is read on.

    Returns:
        The exit code (-9 when killed at the deadline).
    """
    env = dict(os.environ if env is None else env)
    # the subprocess must import this checkout's package, not another installed copy
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ editing fit {' '.join(args)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "editing.cli", "fit", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            while True:
                try:
                    return proc.wait(timeout=None if deadline is None else 1.0)
                except subprocess.TimeoutExpired:
                    if clock() >= deadline:
                        proc.kill()
                        proc.wait()
                        log.write("\n[editing auto: killed at the budget's deadline]\n")
                        return -9
        finally:
            if proc.poll() is None:  # interrupted: do not leave the fit running
                proc.kill()
                proc.wait()


def _consumes_budget(trial) -> bool:
    """Whether a trial counts toward ``n_trials``: done, running or queued; a trial that failed because its worker
    died does not (its retry, a new WAITING trial, takes its place); a surplus trial (pruned unrun) does not."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and "error" in trial.user_attrs


def _done(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)


def make_objective(definition: SweepDefinition, sweep_dir: Path, n_trials: int,
                   runner: Callable[[list[str], Path], int] = run_fit) -> Callable:
    """The optuna objective: one ``editing fit`` per trial; returns the gain in the strictest ball."""
    import optuna

    space = definition.parameters()
    base_path = sweep_dir / "base.yaml"

    ran: list[int] = []

    def objective(trial) -> float:
        # the global budget: a trial goes ahead only when fewer than n_trials budget-consuming trials precede it,
        # so workers asking at the same moment never run more than n_trials fits in all
        trials = trial.study.get_trials(deepcopy=False)
        earlier = [t for t in trials if t.number < trial.number and _consumes_budget(t)]
        if len(earlier) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise optuna.TrialPruned("the study's trial budget is used up")
        params = {key: p.suggest(trial) for key, p in space.items()}
        out = sweep_dir / f"trial_{trial.number}"
        trial.set_user_attr("dir", str(out))
        trial.set_user_attr("host", socket.gethostname())
        retry_of = trials[trial.number].system_attrs.get("failed_trial")
        if retry_of is not None:
            trial.set_user_attr("retry_of", retry_of)
        settings = definition.fit_settings(base_path, out, params=params, save_edits=False)
        start = time.time()
        ran.append(trial.number)
        code = runner(settings.args(), out / "fit.log")
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
               runner: Callable[[list[str], Path], int] = run_fit, log: Callable[[str], None] = print) -> int:
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
    if not any(isinstance(f, _DropTrialErrors) for f in optuna_log.filters):
        optuna_log.addFilter(_DropTrialErrors())
    while True:
        with warnings.catch_warnings():  # experimental since optuna 2.9, the public way to reap dead trials
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(_done(t) for t in trials)
        if done >= n_trials:
            log(f"study {study.study_name}: {done} trials finished; this worker ran {len(objective.ran)}")
            _refuse_all_failed(study.study_name, trials)
            return len(objective.ran)
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        if waiting == 0 and sum(_consumes_budget(t) for t in trials) >= n_trials:
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
            _retry_callback()(study, t)


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
    records = [_trial_record(t) for t in trials if t.state.name == "COMPLETE" and "balls" in t.user_attrs]
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


def open_existing_study(study_name: str, root: str = DEFAULT_ROOT, storage: str | None = None):
    """Open a study for reading; creates nothing (an unknown study is an error listing the known ones)."""
    if storage is None:
        db = Path(root) / study_name / "study.db"
        if not db.is_file():
            known = study_names(root)
            raise ConfigError(f"no sweep {study_name!r} under {root} (no {db}); sweeps there: "
                              f"{', '.join(known) or 'none'}. Check --study_name and --root, or start one with "
                              "`editing sweep`")
    return open_study(make_storage(storage or default_storage(root, study_name), None, create=False), study_name)


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


# ----------------------------------------------------------------------------------------------------------------
# selection
# ----------------------------------------------------------------------------------------------------------------
def _trial_record(trial) -> TrialRecord:
    """A complete trial's record, from its study attributes."""
    attrs = {k: v for k, v in trial.user_attrs.items() if k in (*TrialRecord.OUTCOME, "results", "host")}
    return TrialRecord.from_dict({"trial": trial.number, "params": dict(trial.params), **attrs},
                                 f"trial {trial.number}")


def select_best(records: Iterable[TrialRecord]) -> dict[str, SelectedBall]:
    """Per ball, the trial with the largest success-rate gain inside the ball (SPEC section 6).

    The gain of a trial in a ball is ``success_change_pp`` at the ball's chosen epoch (the last epoch inside it;
    epoch 0 gives zero). Ties go to the smaller degradation, then to the earlier trial.

    Args:
        records: the complete trials.

    Returns:
        Ball key -> the chosen trial's configuration, epoch, gain and degradation (balls sorted largest first).
    """
    best: dict[str, SelectedBall] = {}
    for r in sorted(records, key=lambda r: r.trial):
        for key, b in r.balls.items():
            gain, degradation = float(b.success_change_pp), float(b.degradation)
            if not math.isfinite(gain):
                continue
            current = best.get(key)
            if current is None or (gain, -degradation) > (current.success_change_pp, -current.degradation):
                best[key] = SelectedBall(trial=r.trial, params=r.params, epoch=int(b.epoch), success_change_pp=gain,
                                         degradation=degradation)
    return dict(sorted(best.items(), key=lambda kv: -key_eps(kv[0])))


def study_names(root: str = DEFAULT_ROOT, storage: str | None = None) -> list[str]:
    """The sweeps in a storage (every study made by ``editing sweep``), or, without one, every
    ``<root>/<study>/study.db``."""
    import optuna

    if storage is None:
        return sorted(p.parent.name for p in Path(root).glob("*/study.db"))
    store = make_storage(storage, None, create=False)
    return sorted(s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)
                  if "sweep" in s.user_attrs)


def select(study_name: str | None = None, root: str = DEFAULT_ROOT, storage: str | None = None,
           overwrite: bool = False) -> Selection | dict[str, Selection]:
    """For each ball, the validation configuration with the largest success gain inside the ball, and its epoch.

    Writes ``<root>/<study_name>/selection.json`` (and ``trials.jsonl``: every complete trial's per-epoch record,
    for the report's plots).

    Args:
        study_name: the study (default: every sweep in the storage, or under the root).
        root: the sweep root.
        storage: the study's SQLAlchemy URL (default: the SQLite file under the root).
        overwrite: replace an earlier, different selection (test runs made from it are kept apart by trial number).

    Returns:
        The selection (study name -> selection when several studies were selected).
    """
    if study_name is None:
        names = study_names(root, storage)
        if not names:
            raise ConfigError(f"no sweep found ({storage or root})")
        return {name: select(name, root, storage, overwrite) for name in names}
    study = open_existing_study(study_name, root, storage)
    sweep = study.user_attrs.get("sweep")
    if sweep is None:
        raise ConfigError(f"study {study_name!r} was not made by `editing sweep`")
    records = [_trial_record(t) for t in study.get_trials(deepcopy=False)
               if t.state.name == "COMPLETE" and "balls" in t.user_attrs]
    if not records:
        raise ConfigError(f"study {study_name!r} has no complete trial yet")
    selection = Selection(study=study_name, sweep=sweep, trials=len(records), balls=select_best(records),
                          created=now())
    out = Path(root) / study_name
    path = out / SELECTION_FILE
    if path.is_file():
        try:  # a selection made again from the same trials is the same one: no need to ask for --overwrite
            same = Selection.read(path).balls == selection.balls
        except RecordError:
            same = False
        if not same:
            ensure_writable(path, overwrite, "--overwrite true")
    write_json(path, selection.to_dict(), overwrite=True)
    write_jsonl(out / TRIALS_FILE, [r.to_dict() for r in records], overwrite=True)
    print(selection_table(selection))
    print(f"selection: {path}")
    return selection


# ----------------------------------------------------------------------------------------------------------------
# test runs
# ----------------------------------------------------------------------------------------------------------------
def test_run_plan(selection: Selection) -> dict[int, dict]:
    """Group the selected balls by trial: one test run per (trial, seed) serves every ball that chose the trial,
    each with its own epoch cap (``budget.max_epoch``).

    Returns:
        Trial -> ``{"params": its sampled values, "max_epoch": {ball key: epoch}}``.
    """
    plan: dict[int, dict] = {}
    for key, b in selection.balls.items():
        entry = plan.setdefault(b.trial, {"params": b.params, "max_epoch": {}})
        entry["max_epoch"][key] = b.epoch
    return plan


def test_runs(study_name: str | None = None, root: str = DEFAULT_ROOT, seeds: int = 10,
              seed_list: list[int] | None = None, args: str | None = None,
              runner: Callable[[list[str], Path], int] | None = None) -> list[Path]:
    """Rerun each selected configuration on the test pair with several seeds (SPEC section 6).

    Each run trains as at validation (same settings, same number of epochs, so the same learning-rate schedule)
    with ``--seed_everything s --data.seed s`` and reports per ball the last epoch inside the ball but never one
    later than the epoch chosen at validation. Results: ``<root>/<study>/test/trial_<n>/seed_<s>/results.json``.
    Finished seeds are skipped, so the command resumes; results are never overwritten.

    Args:
        study_name: the study (its ``selection.json`` must exist: run ``editing select`` first); default: every
            study under the root with a selection.
        root: the sweep root.
        seeds: number of seeds (0 .. seeds-1).
        seed_list: explicit seeds instead (e.g. to split the work between machines).
        args: extra ``editing fit`` arguments for the test runs (after the sweep's own), one string.
        runner: runs one fit (tests replace it).

    Returns:
        The results files of all selected (trial, seed) runs.
    """
    if study_name is None:
        names = sorted(p.parent.name for p in Path(root).glob(f"*/{SELECTION_FILE}"))
        if not names:
            raise ConfigError(f"no selection.json under {root}: run `editing select` first")
        return [p for name in names for p in test_runs(name, root, seeds, seed_list, args, runner)]
    sweep_dir = Path(root) / study_name
    path = sweep_dir / SELECTION_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `editing select --study_name {study_name}` first")
    selection = Selection.read(path)
    definition = SweepDefinition(**selection.sweep)
    _require_test_files(definition.task)
    base = sweep_dir / "base.yaml"
    if not base.is_file():
        write_text(base, definition.base_config)
    runner = runner or run_fit
    done: list[Path] = []
    plan = test_run_plan(selection)
    for trial, entry in sorted(plan.items()):
        for seed in (seed_list if seed_list is not None else range(seeds)):
            out = (sweep_dir / "test" / f"trial_{trial}" / f"seed_{seed}").resolve()
            results = out / RESULTS_FILE
            if results.is_file():
                try:
                    RunRecord.read(results)
                except RecordError as err:
                    # damaged (truncated, ...): `report` could not use it; the seed runs again, the file kept aside
                    aside = out.with_name(f"{out.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
                    out.rename(aside)
                    print(f"trial {trial} seed {seed}: its results cannot be read ({err}); the run was moved to "
                          f"{aside} and runs again", flush=True)
                else:
                    print(f"trial {trial} seed {seed}: done already ({results})", flush=True)
                    done.append(results)
                    continue
            if out.exists():
                # an interrupted run (no results.json): keep its files aside and start the seed afresh
                aside = out.with_name(f"{out.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
                out.rename(aside)
                print(f"trial {trial} seed {seed}: an interrupted run was moved to {aside}", flush=True)
            settings = definition.fit_settings(base.resolve(), out, params=entry["params"], split="test", seed=seed,
                                               max_epoch=entry["max_epoch"], extra=tuple(split_args(args)))
            print(f"trial {trial} seed {seed}: balls {', '.join(entry['max_epoch'])} -> {out}", flush=True)
            start = time.time()
            code = runner(settings.args(), out / "fit.log")
            if code != 0 or not results.is_file():
                raise RuntimeError(f"test run trial {trial} seed {seed} failed (exit {code}); see {out / 'fit.log'}")
            print(f"trial {trial} seed {seed}: finished in {time.time() - start:.0f}s", flush=True)
            done.append(results)
    return done


def _require_test_files(task: str) -> None:
    """Refuse test runs of a task whose files do not depend on the split (a task YAML without ``{split}``): they would
    train and evaluate on the validation files and report them as the test pair."""
    from editing.rules.tasks import get_task

    same = get_task(task).files_without_split()
    if same:
        raise ConfigError(f"task {task}: the {', '.join(same)} path(s) have no {{split}}, so the test runs would reuse "
                          "the validation files; write the task's paths with {split} (e.g. evaluation: "
                          "data/eval-{split}.jsonl) and give a -val and a -test file for each")

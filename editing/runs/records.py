"""Typed records of the results files: a fit's ``results.json`` (``RunRecord``), an evaluation's
``evaluation.json`` (``EvaluationRecord``), and the protocol's ``selection.json`` (``Selection``) and
``trials.jsonl`` rows (``TrialRecord``).

Every writer builds a record and every reader reads one, so a file's layout is written once, here. Each file carries
a ``schema_version`` (``SCHEMA_VERSION``); a file without one is schema 1, the layout written before the field
existed, which reads as it always did. A file of a newer schema than this version knows is refused with a message
that says so, rather than misread. ``to_dict`` gives the JSON layout (the fields in a fixed order); ``from_dict``
checks what it reads and names the file and field of anything malformed.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing import __version__
from editing.core.errors import ConfigError
from editing.core.files import ensure_writable, write_json, write_jsonl
from editing.core.textfiles import read_text
from editing.core.types import EVALUATED_METRICS, PRACTITIONER_METRICS, LossType, Metric, RunStatus, Stage
from editing.rules.budget import Ball, choose_epochs, degradation, key_eps, success_change_pp

SCHEMA_VERSION = 2
"""The layout written now. 1: files written before ``schema_version`` existed (the same fields, without it)."""
SCHEMA_FIELD = "schema_version"
RESULTS_FILE = "results.json"
EVALUATION_FILE = "evaluation.json"
SCORES_FILE = "evaluation_scores.jsonl"
SELECTION_FILE = "selection.json"
TRIALS_FILE = "trials.jsonl"


class RecordError(ConfigError):
    """A results file cannot be read as its record: not JSON, of an unknown or newer schema, or a field is missing
    or malformed. The message names the file and the field."""


def now() -> str:
    """The time stamp of a record (UTC, seconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# reading helpers: every check names the file and the field
# ----------------------------------------------------------------------------------------------------------------
class _Reader:
    """Reads the fields of one JSON object, naming ``source`` and the field's path in errors."""

    def __init__(self, data: Any, source: str, where: str = "") -> None:
        self.source = source
        self.where = where
        if not isinstance(data, Mapping):
            self.fail(f"expected a JSON object, found {type(data).__name__}")
        self.data = data

    def fail(self, problem: str) -> None:
        at = f" (field {self.where!r})" if self.where else ""
        raise RecordError(f"{self.source}{at}: {problem}; the file is damaged or was not written by "
                          "canonical-editing (rerun the command that writes it)")

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                _Reader({}, self.source, self._path(key)).fail("missing")
            return default
        return self.data[key]

    def sub(self, key: str) -> _Reader:
        return _Reader(self.raw(key), self.source, self._path(key))

    def items(self) -> Iterable[tuple[str, _Reader]]:
        for key, value in self.data.items():
            yield str(key), _Reader(value, self.source, self._path(str(key)))

    def text(self, key: str, default: Any = ...) -> str | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, str):
            _Reader({}, self.source, self._path(key)).fail(f"expected text, found {value!r}")
        return value

    def whole(self, key: str, default: Any = ...) -> int | None:
        value = self.raw(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            _Reader({}, self.source, self._path(key)).fail(f"expected a whole number, found {value!r}")
        return value

    def number(self, key: str, default: Any = ...) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        # non-finite values are written as strings ("nan", "inf", "-inf"): see editing.core.files.jsonable
        if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _Reader({}, self.source, self._path(key)).fail(f"expected a number, found {value!r}")
        return float(value)

    def mapping(self, key: str, default: Any = ...) -> dict | None:
        value = self.raw(key, default)
        if value is not None and not isinstance(value, Mapping):
            _Reader({}, self.source, self._path(key)).fail(f"expected an object, found {value!r}")
        return None if value is None else dict(value)

    def array(self, key: str) -> list:
        value = self.raw(key)
        if not isinstance(value, list):
            _Reader({}, self.source, self._path(key)).fail(f"expected a list, found {type(value).__name__}")
        return value

    def named(self, key: str, kind: type, default: Any = ...) -> Any:
        value = self.raw(key, default)
        if value is None:
            return None
        try:
            return kind(value)
        except (ConfigError, ValueError) as err:
            _Reader({}, self.source, self._path(key)).fail(str(err))


def check_schema(data: Any, source: str, what: str) -> int:
    """The schema version of a record's JSON object (1 when it has none).

    Raises:
        RecordError: not an object, a version that is not a whole number >= 1, or one newer than ``SCHEMA_VERSION``.
    """
    reader = _Reader(data, source)
    version = reader.raw(SCHEMA_FIELD, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordError(f"{source}: unknown {SCHEMA_FIELD} {version!r} (expected a whole number from 1 to "
                          f"{SCHEMA_VERSION}); this is not a {what} written by canonical-editing")
    if version > SCHEMA_VERSION:
        raise RecordError(f"{source}: a {what} of schema {version}, newer than this version of canonical-editing "
                          f"({__version__}) reads (schemas 1 to {SCHEMA_VERSION}); upgrade canonical-editing to "
                          "read it")
    return version


def load_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; a missing, non-UTF-8 or malformed file is a ``RecordError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: no such {what} file")
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); the {what} "
                          "is damaged (rerun the command that writes it)") from None
    except ConfigError as err:
        raise RecordError(str(err)) from None


def _ball_key(reader: _Reader, key: str) -> str:
    try:
        key_eps(key)
    except ConfigError as err:
        reader.fail(str(err))
    return key


# ----------------------------------------------------------------------------------------------------------------
# parts
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskRef:
    """The task a record was computed on: its name, loss type and success threshold."""

    name: str
    loss: LossType
    threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", LossType(self.loss))  # a plain string gets the typed value (or an error)

    @classmethod
    def of(cls, task: Any) -> TaskRef:
        """From a ``TaskSpec`` (or anything with ``name``, ``loss`` and ``threshold``)."""
        return cls(task.name, LossType(task.loss), float(task.threshold))

    def to_dict(self) -> dict:
        """JSON form."""
        return {"name": self.name, "loss": self.loss.value, "threshold": self.threshold}

    @classmethod
    def read(cls, r: _Reader) -> TaskRef:
        return cls(r.text("name"), r.named("loss", LossType), r.number("threshold"))


@dataclass(frozen=True)
class Metrics:
    """The four metrics an evaluation measures (each None when its set was empty) and, in a fit's records, the
    degradation relative to epoch 0 (None elsewhere).

    The practitioner's metrics (``PRACTITIONER_METRICS``: reliability and its mean score, the evaluation set's mean
    score, locality) are optional: None when not measured, written only when measured, and read as None from files
    written before they existed (schemas 1 and 2 alike). ``generalization`` is ``success_rate``.
    """

    success_rate: float | None
    general_nll: float | None
    targeted_nll: float | None
    hard_negative_nll: float | None
    degradation: float | None = None
    reliability: float | None = None
    reliability_mean_score: float | None = None
    generalization_mean_score: float | None = None
    locality: float | None = None

    @classmethod
    def of(cls, summary: Mapping[str, Any], degradation: float | None = None) -> Metrics:
        """From an evaluation summary (or any mapping with the metric names as keys)."""
        return cls(*(summary.get(m) for m in EVALUATED_METRICS), degradation=degradation,
                   **{m.value: summary.get(m.value) for m in PRACTITIONER_METRICS})

    @property
    def generalization(self) -> float | None:
        """The paper's success rate on the evaluation set, under the name a practitioner reads."""
        return self.success_rate

    def __getitem__(self, metric: Metric | str) -> float | None:
        return getattr(self, Metric(metric).value)

    def to_dict(self) -> dict:
        """``{metric: value}`` in the order of ``Metric``; the degradation and the practitioner's metrics only when
        there are some."""
        out = {m.value: self[m] for m in EVALUATED_METRICS}
        if self.degradation is not None:
            out[Metric.DEGRADATION.value] = self.degradation
        out.update(self.practitioner())
        return out

    def practitioner(self) -> dict:
        """The practitioner's metrics that were measured, ``{name: value}``."""
        return {m.value: self[m] for m in PRACTITIONER_METRICS if self[m] is not None}

    @classmethod
    def read(cls, r: _Reader, with_degradation: bool = False) -> Metrics:
        values = [r.number(m.value) for m in EVALUATED_METRICS]
        return cls(*values, degradation=r.number(Metric.DEGRADATION.value) if with_degradation else None,
                   **{m.value: r.number(m.value, None) for m in PRACTITIONER_METRICS})


@dataclass(frozen=True)
class EpochRecord:
    """One evaluated epoch of a fit (epoch 0 is the unedited model p0)."""

    epoch: int
    metrics: Metrics
    counts: dict[str, int]
    general_sample: dict | None = None
    """When the degradation was measured on a sample of G (``--budget.general_sample``, issue 36 item 6): the
    sample size (``texts`` of ``total``), the estimate and its interval (``low``, ``high``, ``level``); None: all of
    G."""

    @classmethod
    def of(cls, epoch: int, summary: Mapping[str, Any], initial_general_nll: float | None = None) -> EpochRecord:
        """From an evaluation summary; the degradation is measured against ``initial_general_nll`` (epoch 0's; None
        for epoch 0 itself, whose degradation is 0)."""
        nll = summary[Metric.GENERAL_NLL]
        base = nll if initial_general_nll is None else initial_general_nll
        return cls(int(epoch), Metrics.of(summary, degradation(nll, base)), dict(summary["counts"]))

    def to_dict(self) -> dict:
        """The per-epoch layout of ``results.json`` (also the callback's checkpointed history)."""
        m = self.metrics.to_dict()
        out = {"epoch": self.epoch, **{k: m[k] for k in (x.value for x in EVALUATED_METRICS)}, "counts": self.counts}
        out[Metric.DEGRADATION.value] = self.metrics.degradation
        out.update(self.metrics.practitioner())
        if self.general_sample is not None:
            out["general_sample"] = dict(self.general_sample)
        return out

    @classmethod
    def from_dict(cls, data: Mapping, source: str = "epoch record") -> EpochRecord:
        """From ``to_dict``'s layout."""
        return cls.read(_Reader(data, source))

    @classmethod
    def read(cls, r: _Reader) -> EpochRecord:
        return cls(r.whole("epoch"), Metrics.read(r, with_degradation=True), r.mapping("counts", {}),
                   r.mapping("general_sample", None))


@dataclass(frozen=True)
class BallRecord:
    """A ball's outcome in a fit: the reported epoch, its metrics and the success change (percentage points)."""

    epoch: int
    metrics: Metrics
    success_change_pp: float

    def to_dict(self) -> dict:
        """JSON form."""
        return {"epoch": self.epoch, "metrics": self.metrics.to_dict(), "success_change_pp": self.success_change_pp}

    @classmethod
    def read(cls, r: _Reader) -> BallRecord:
        return cls(r.whole("epoch"), Metrics.read(r.sub("metrics"), with_degradation=True),
                   r.number("success_change_pp"))


def ball_records(epochs: Sequence[EpochRecord], balls: Iterable[float | Ball] | None = None,
                 max_epoch: Mapping[str, int] | None = None,
                 initial_general_nll: float | None = None, epoch_rule: str = "last") -> dict[str, BallRecord]:
    """Per ball: the reported epoch (``editing.rules.budget.choose_epochs``), its metrics, and the success change from
    epoch 0 in percentage points.

    Args:
        epochs: the evaluated epochs, epoch 0 first.
        balls: the balls (default ``DEFAULT_BALLS``).
        max_epoch: per ball key, an epoch not to go past (the test pair's rule).
        initial_general_nll: the general NLL the balls are around (default: epoch 0's; a fit on top of an earlier
            edit passes the original base model's, ``choose_epochs``).
        epoch_rule: ``last`` (SPEC section 6) or ``best`` (``editing.rules.budget.EPOCH_RULES``).
    """
    chosen = choose_epochs([e.to_dict() for e in epochs], balls, max_epoch, initial_general_nll, epoch_rule)
    by_epoch = {e.epoch: e for e in epochs}
    initial = epochs[0].metrics.success_rate
    return {key: BallRecord(epoch, by_epoch[epoch].metrics,
                            success_change_pp(initial, by_epoch[epoch].metrics.success_rate))
            for key, epoch in chosen.items()}


@dataclass(frozen=True)
class StoppedEarly:
    """A fit that stopped before ``max_epochs`` by its patience: after which epoch, and why."""

    epoch: int
    reason: str

    def to_dict(self) -> dict:
        """JSON form."""
        return {"epoch": self.epoch, "reason": self.reason}


# ----------------------------------------------------------------------------------------------------------------
# a fit's results.json
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """A fit's ``results.json``, written by the DegradationBudget callback; ``select``, ``test-runs`` and
    ``report`` read it.

    Attributes:
        method: the editing method's registered name (``lora``, ``full``, ...).
        task: the task.
        split: the data split (``val`` or ``test``).
        model: the base model's identity (name, source, fingerprint, number of parameters, ...).
        seed: the data seed.
        config: the resolved command-line config (None for fits started outside the CLI).
        hyperparameters: the module's hyperparameters.
        status: finished, or diverged.
        diverged_at_epoch: the epoch whose loss diverged (None: it did not).
        stopped_early: when and why the fit stopped before ``max_epochs`` (None: it did not).
        epochs: every evaluated epoch, epoch 0 (p0) first.
        balls: ball key -> the ball's outcome, in the run's order of balls.
        edits: ball key -> the folder of its exported edit.
        data_files: paths, hashes and counts of the data files used.
        created: when the record was written (UTC).
        editing_version: the package version that wrote it.
        schema_version: the schema of the file the record was read from (1: a file without the field); not
            compared, and ``to_dict`` always writes the current layout (``SCHEMA_VERSION``).
    """

    method: str
    task: TaskRef
    split: str
    model: dict
    seed: int | None
    config: dict | None
    hyperparameters: dict
    status: RunStatus
    diverged_at_epoch: int | None
    stopped_early: StoppedEarly | None
    epochs: list[EpochRecord]
    balls: dict[str, BallRecord]
    edits: dict[str, str] = field(default_factory=dict)
    data_files: dict = field(default_factory=dict)
    created: str = field(default_factory=now)
    editing_version: str = __version__
    schema_version: int = field(default=SCHEMA_VERSION, compare=False)

    def __post_init__(self) -> None:
        self.status = RunStatus(self.status)

    @property
    def initial(self) -> EpochRecord:
        """Epoch 0: the unedited model."""
        return self.epochs[0]

    @property
    def chat_template(self) -> bool | str:
        """The ``data.chat_template`` the run was fitted with (``editing.data.chat``); False when its config has none
        or holds something that is not a setting."""
        setting = ((self.config or {}).get("data") or {}).get("chat_template", False)
        return setting if isinstance(setting, (bool, str)) else False

    @property
    def num_parameters(self) -> int | None:
        """The base model's number of parameters, when recorded."""
        return self.model.get("num_parameters")

    def to_dict(self) -> dict:
        """The JSON layout of ``results.json`` (``schema_version`` first, then the fields in their order)."""
        return {
            SCHEMA_FIELD: SCHEMA_VERSION,
            "method": self.method,
            "task": self.task.to_dict(),
            "split": self.split,
            "model": self.model,
            "seed": self.seed,
            "config": self.config,
            "hyperparameters": self.hyperparameters,
            "status": self.status.value,
            "diverged_at_epoch": self.diverged_at_epoch,
            "stopped_early": None if self.stopped_early is None else self.stopped_early.to_dict(),
            "epochs": [e.to_dict() for e in self.epochs],
            "balls": {key: b.to_dict() for key, b in self.balls.items()},
            "edits": dict(self.edits),
            "data_files": self.data_files,
            "created": self.created,
            "editing_version": self.editing_version,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = RESULTS_FILE) -> RunRecord:
        """Read a ``results.json`` object of any known schema.

        Raises:
            RecordError: an unknown or newer schema, or a field missing or malformed (the message names it).
        """
        version = check_schema(data, source, "fit's results file")
        r = _Reader(data, source)
        epochs = [EpochRecord.read(_Reader(e, source, f"epochs[{i}]")) for i, e in enumerate(r.array("epochs"))]
        if not epochs:
            r.sub("epochs").fail("no epoch recorded (a fit records epoch 0 at least)")
        stopped = r.mapping("stopped_early", None)
        if stopped is not None:
            s = r.sub("stopped_early")
            stopped = StoppedEarly(s.whole("epoch"), s.text("reason"))
        balls_reader = r.sub("balls")
        edits = r.mapping("edits", {})
        return cls(
            method=r.text("method"), task=TaskRef.read(r.sub("task")), split=r.text("split"),
            model=r.mapping("model"), seed=r.whole("seed", None), config=r.mapping("config", None),
            hyperparameters=r.mapping("hyperparameters", {}),
            status=r.named("status", RunStatus), diverged_at_epoch=r.whole("diverged_at_epoch", None),
            stopped_early=stopped, epochs=epochs,
            balls={_ball_key(b, key): BallRecord.read(b) for key, b in balls_reader.items()},
            edits={str(k): str(v) for k, v in edits.items()}, data_files=r.mapping("data_files", {}),
            created=r.text("created", ""), editing_version=r.text("editing_version", ""), schema_version=version,
        )

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        """Read a ``results.json`` file (see ``from_dict``)."""
        return cls.from_dict(load_json(path, "results"), str(path))

    def write(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the record atomically (never over an existing file unless ``overwrite``)."""
        return write_json(path, self.to_dict(), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# an evaluation's evaluation.json (+ evaluation_scores.jsonl)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class EvaluationRecord:
    """``evaluation.json``: the metrics of one model on one task and split, written by ``editing validate``,
    ``test``, ``apply`` and ``evaluate`` (the per-example scores go to ``scores_file`` beside it)."""

    stage: Stage
    task: TaskRef
    split: str
    metrics: Metrics
    counts: dict[str, int]
    model: dict
    data_files: dict
    scores_file: str = SCORES_FILE
    created: str = field(default_factory=now)
    editing_version: str = __version__
    config: dict | None = None
    schema_version: int = field(default=SCHEMA_VERSION, compare=False)

    def __post_init__(self) -> None:
        self.stage = Stage(self.stage)

    def to_dict(self) -> dict:
        """The JSON layout (``config`` only when there is one)."""
        out = {
            SCHEMA_FIELD: SCHEMA_VERSION,
            "stage": self.stage.value,
            "task": self.task.to_dict(),
            "split": self.split,
            "metrics": self.metrics.to_dict(),
            "counts": self.counts,
            "model": self.model,
            "data_files": self.data_files,
            "scores_file": self.scores_file,
            "created": self.created,
            "editing_version": self.editing_version,
        }
        if self.config is not None:
            out["config"] = self.config
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = EVALUATION_FILE) -> EvaluationRecord:
        """Read an ``evaluation.json`` object of any known schema (see ``RunRecord.from_dict``)."""
        version = check_schema(data, source, "evaluation file")
        r = _Reader(data, source)
        return cls(stage=r.named("stage", Stage), task=TaskRef.read(r.sub("task")), split=r.text("split"),
                   metrics=Metrics.read(r.sub("metrics")), counts=r.mapping("counts", {}), model=r.mapping("model"),
                   data_files=r.mapping("data_files", {}), scores_file=r.text("scores_file", SCORES_FILE),
                   created=r.text("created", ""), editing_version=r.text("editing_version", ""),
                   config=r.mapping("config", None), schema_version=version)

    @classmethod
    def read(cls, path: str | Path) -> EvaluationRecord:
        """Read an ``evaluation.json`` file."""
        return cls.from_dict(load_json(path, "evaluation"), str(path))


def write_evaluation(output_dir: str | Path, summary: dict, *, stage: Stage | str, task, split: str, identity: dict,
                     data_files: dict, overwrite: bool = False, config: dict | None = None) -> Path:
    """Write ``evaluation.json`` and ``evaluation_scores.jsonl`` into ``output_dir``.

    Args:
        output_dir: destination folder.
        summary: an evaluation summary (metrics, counts, per-example scores).
        stage: ``validate``, ``test`` or ``apply``.
        task: the ``TaskSpec``.
        split: data split.
        identity: the model identity.
        data_files: paths, hashes and counts of the data files used.
        overwrite: replace existing files.
        config: the resolved config, recorded in the JSON.

    Returns:
        The JSON's path.
    """
    output_dir = Path(output_dir)
    json_path = output_dir / EVALUATION_FILE
    scores_path = output_dir / SCORES_FILE
    for path in (json_path, scores_path):
        ensure_writable(path, overwrite)
    write_jsonl(scores_path, summary["per_example"], overwrite=overwrite)
    record = EvaluationRecord(stage=Stage(stage), task=TaskRef.of(task), split=split, metrics=Metrics.of(summary),
                              counts=summary["counts"], model=identity, data_files=data_files,
                              scores_file=scores_path.name, config=config)
    return write_json(json_path, record.to_dict(), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------------------
# the protocol: a trial's outcome (trials.jsonl, the study's trial attributes) and the selection
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialBall:
    """A validation trial's outcome in one ball (kept in the study, so that ``select`` needs only the database)."""

    epoch: int
    success_change_pp: float
    degradation: float
    success_rate: float | None = None
    hard_negative_nll: float | None = None

    @classmethod
    def of(cls, ball: BallRecord) -> TrialBall:
        """From a fit's ball record."""
        m = ball.metrics
        return cls(ball.epoch, ball.success_change_pp, m.degradation, m.success_rate, m.hard_negative_nll)

    def to_dict(self) -> dict:
        """JSON form."""
        return {"epoch": self.epoch, "success_change_pp": self.success_change_pp,
                Metric.DEGRADATION.value: self.degradation, Metric.SUCCESS_RATE.value: self.success_rate,
                Metric.HARD_NEGATIVE_NLL.value: self.hard_negative_nll}

    @classmethod
    def read(cls, r: _Reader) -> TrialBall:
        return cls(r.whole("epoch"), r.number("success_change_pp"), r.number(Metric.DEGRADATION.value),
                   r.number(Metric.SUCCESS_RATE.value, None), r.number(Metric.HARD_NEGATIVE_NLL.value, None))


# the per-epoch metrics a trial keeps (for the report's scatter plots), in their order in the study
TRIAL_EPOCH_FIELDS = ("epoch", Metric.SUCCESS_RATE, Metric.GENERAL_NLL, Metric.DEGRADATION, Metric.TARGETED_NLL,
                      Metric.HARD_NEGATIVE_NLL)


@dataclass
class TrialRecord:
    """One complete validation trial: its sampled parameters and outcome (a row of ``trials.jsonl``)."""

    trial: int
    params: dict[str, Any]
    balls: dict[str, TrialBall]
    history: list[dict] = field(default_factory=list)
    status: str | None = None
    results: str | None = None
    num_parameters: int | None = None
    host: str | None = None

    OUTCOME = ("status", "balls", "history", "num_parameters")
    """The fields a trial stores as study attributes (the rest come from the trial itself)."""

    @classmethod
    def of_run(cls, run: RunRecord, trial: int = -1, params: Mapping[str, Any] | None = None,
               results: str | None = None, host: str | None = None) -> TrialRecord:
        """The compact outcome of a fit: per ball the epoch and gain, and the per-epoch metrics."""
        history = []
        for e in run.epochs:
            row = e.to_dict()
            history.append({str(k): row.get(k) for k in TRIAL_EPOCH_FIELDS})
        return cls(trial, dict(params or {}), {key: TrialBall.of(b) for key, b in run.balls.items()}, history,
                   run.status.value, results, run.num_parameters, host)

    def outcome(self) -> dict:
        """The fields stored as the trial's study attributes."""
        d = self.to_dict()
        return {k: d[k] for k in self.OUTCOME}

    def to_dict(self) -> dict:
        """JSON form (a row of ``trials.jsonl``)."""
        return {"trial": self.trial, "params": self.params, "balls": {k: b.to_dict() for k, b in self.balls.items()},
                "history": self.history, "status": self.status, "results": self.results,
                "num_parameters": self.num_parameters, "host": self.host}

    @classmethod
    def from_dict(cls, data: Any, source: str = "trial record") -> TrialRecord:
        """From ``to_dict``'s layout (or a trial's attributes plus ``trial`` and ``params``)."""
        r = _Reader(data, source)
        balls = r.sub("balls") if r.has("balls") else _Reader({}, source, "balls")
        history = r.raw("history", [])
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            r.sub("history").fail("expected a list of per-epoch objects")
        return cls(trial=r.whole("trial"), params=r.mapping("params", {}),
                   balls={_ball_key(b, key): TrialBall.read(b) for key, b in balls.items()},
                   history=[dict(h) for h in history], status=r.text("status", None), results=r.text("results", None),
                   num_parameters=r.whole("num_parameters", None), host=r.text("host", None))


@dataclass(frozen=True)
class SelectedBall:
    """The validation configuration chosen for a ball: its trial, parameters, epoch, gain and degradation."""

    trial: int
    params: dict[str, Any]
    epoch: int
    success_change_pp: float
    degradation: float

    def to_dict(self) -> dict:
        """JSON form."""
        return {"trial": self.trial, "params": self.params, "epoch": self.epoch,
                "success_change_pp": self.success_change_pp, Metric.DEGRADATION.value: self.degradation}

    @classmethod
    def read(cls, r: _Reader) -> SelectedBall:
        return cls(r.whole("trial"), r.mapping("params", {}), r.whole("epoch"), r.number("success_change_pp"),
                   r.number(Metric.DEGRADATION.value))


@dataclass
class Selection:
    """``selection.json``: per ball, the best validation configuration of a study (written by ``select``; read by
    ``test-runs`` and ``report``)."""

    study: str
    sweep: dict
    trials: int
    balls: dict[str, SelectedBall]
    created: str | None = None
    schema_version: int = field(default=SCHEMA_VERSION, compare=False)

    def to_dict(self) -> dict:
        """JSON form (``created`` only when set)."""
        out = {SCHEMA_FIELD: SCHEMA_VERSION, "study": self.study, "sweep": self.sweep, "trials": self.trials,
               "balls": {k: b.to_dict() for k, b in self.balls.items()}}
        if self.created is not None:
            out["created"] = self.created
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = SELECTION_FILE) -> Selection:
        """Read a ``selection.json`` object of any known schema."""
        version = check_schema(data, source, "selection")
        r = _Reader(data, source)
        return cls(study=r.text("study"), sweep=r.mapping("sweep"), trials=r.whole("trials"),
                   balls={_ball_key(b, key): SelectedBall.read(b) for key, b in r.sub("balls").items()},
                   created=r.text("created", None), schema_version=version)

    @classmethod
    def read(cls, path: str | Path) -> Selection:
        """Read a ``selection.json`` file."""
        return cls.from_dict(load_json(path, "selection"), str(path))


def read_trials(path: str | Path) -> list[TrialRecord]:
    """The rows of a ``trials.jsonl`` file (none when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{path}, line {lineno}: not valid JSON ({err.msg}); rerun `editing select`") from None
        rows.append(TrialRecord.from_dict(data, f"{path}, line {lineno}"))
    return rows


__all__ = ["EVALUATION_FILE", "RESULTS_FILE", "SCHEMA_VERSION", "SCORES_FILE", "SELECTION_FILE", "TRIALS_FILE",
           "BallRecord", "EpochRecord", "EvaluationRecord", "Metrics", "RecordError", "RunRecord", "SelectedBall",
           "Selection", "StoppedEarly", "TaskRef", "TrialBall", "TrialRecord", "ball_records", "check_schema",
           "load_json", "now", "read_trials", "write_evaluation"]

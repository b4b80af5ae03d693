"""Selection on the validation pair (SPEC section 6): per ball, the sweep's trial with the largest success gain
inside the ball, and its epoch; written as ``<root>/<study>/selection.json`` (with ``trials.jsonl``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from editing.core.errors import ConfigError
from editing.core.files import ensure_writable, write_json, write_jsonl
from editing.protocol.storage import DEFAULT_ROOT, open_existing_study, study_names
from editing.rules.budget import key_eps
from editing.runs.records import (
    SELECTION_FILE,
    TRIALS_FILE,
    RecordError,
    SelectedBall,
    Selection,
    TrialRecord,
    now,
)
from editing.runs.tables import selection_table


def trial_record(trial) -> TrialRecord:
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
    records = [trial_record(t) for t in study.get_trials(deepcopy=False)
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

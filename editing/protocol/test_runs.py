"""Test runs (SPEC section 6): each configuration selected at validation retrained on the test pair with several
seeds, under ``<root>/<study>/test/trial_<n>/seed_<s>/``; finished seeds are skipped, so the command resumes."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from editing.core.errors import ConfigError
from editing.core.files import write_text
from editing.protocol import trials
from editing.protocol.storage import DEFAULT_ROOT
from editing.protocol.sweep import SweepDefinition
from editing.runs.records import RESULTS_FILE, SELECTION_FILE, RecordError, RunRecord, Selection

Runner = Callable[[list[str], Path], int]


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
              runner: Runner | None = None) -> list[Path]:
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
        runner: runs one fit (tests replace it; default ``trials.run_fit``).

    Returns:
        The results files of all selected (trial, seed) runs.
    """
    if study_name is None:
        names = sorted(p.parent.name for p in Path(root).glob(f"*/{SELECTION_FILE}"))
        if not names:
            raise ConfigError(f"no selection.json under {root}: run `editing select` first")
        return [p for name in names for p in test_runs(name, root, seeds, seed_list, args, runner)]
    sweep_dir = Path(root) / study_name
    selection, definition = _read_selection(sweep_dir, study_name)
    base = sweep_dir / "base.yaml"
    if not base.is_file():
        write_text(base, definition.base_config)
    done: list[Path] = []
    for trial, entry in sorted(test_run_plan(selection).items()):
        for seed in (seed_list if seed_list is not None else range(seeds)):
            out = (sweep_dir / "test" / f"trial_{trial}" / f"seed_{seed}").resolve()
            results = _finished_results(out, f"trial {trial} seed {seed}")
            if results is None:
                results = _run_seed(definition, base.resolve(), out, trial, seed, entry, trials.split_args(args),
                                    runner or trials.run_fit)
            done.append(results)
    return done


def _read_selection(sweep_dir: Path, study_name: str) -> tuple[Selection, SweepDefinition]:
    """A study's selection and the sweep it was made from; refuses a task whose test files are its validation files."""
    path = sweep_dir / SELECTION_FILE
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run `editing select --study_name {study_name}` first")
    selection = Selection.read(path)
    definition = SweepDefinition(**selection.sweep)
    _require_test_files(definition.task)
    return selection, definition


def _finished_results(out: Path, name: str) -> Path | None:
    """The results of a seed that ran to the end already (None: run it), moving aside a damaged or interrupted run's
    folder so that the seed starts afresh without losing its files."""
    results = out / RESULTS_FILE
    if results.is_file():
        try:
            RunRecord.read(results)
        except RecordError as err:
            # damaged (truncated, ...): `report` could not use it; the seed runs again, the file kept aside
            aside = out.with_name(f"{out.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(aside)
            print(f"{name}: its results cannot be read ({err}); the run was moved to {aside} and runs again",
                  flush=True)
        else:
            print(f"{name}: done already ({results})", flush=True)
            return results
    if out.exists():
        # an interrupted run (no results.json): keep its files aside and start the seed afresh
        aside = out.with_name(f"{out.name}.interrupted-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        print(f"{name}: an interrupted run was moved to {aside}", flush=True)
    return None


def _run_seed(definition: SweepDefinition, base: Path, out: Path, trial: int, seed: int, entry: dict,
              extra: Sequence[str], runner: Runner) -> Path:
    """Run one (trial, seed) on the test pair, capped per ball at the epoch chosen at validation; its results file."""
    settings = definition.fit_settings(base, out, params=entry["params"], split="test", seed=seed,
                                       max_epoch=entry["max_epoch"], extra=tuple(extra))
    print(f"trial {trial} seed {seed}: balls {', '.join(entry['max_epoch'])} -> {out}", flush=True)
    start = time.time()
    code = runner(settings.args(), out / "fit.log")
    results = out / RESULTS_FILE
    if code != 0 or not results.is_file():
        raise RuntimeError(f"test run trial {trial} seed {seed} failed (exit {code}); see {out / 'fit.log'}")
    print(f"trial {trial} seed {seed}: finished in {time.time() - start:.0f}s", flush=True)
    return results


def _require_test_files(task: str) -> None:
    """Refuse test runs of a task whose files do not depend on the split (a task YAML without ``{split}``): they would
    train and evaluate on the validation files and report them as the test pair."""
    from editing.rules.tasks import get_task

    same = get_task(task).files_without_split()
    if same:
        raise ConfigError(f"task {task}: the {', '.join(same)} path(s) have no {{split}}, so the test runs would reuse "
                          "the validation files; write the task's paths with {split} (e.g. evaluation: "
                          "data/eval-{split}.jsonl) and give a -val and a -test file for each")

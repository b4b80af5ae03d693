"""``editing evaluate``: one model on several tasks, loaded once, one table.

The run claims its output folder (``run.lock``, ``editing.runs.run_folder``) with its settings, and writes each task's
results as soon as the task is done. A run that was interrupted (Ctrl-C, SIGTERM, kill -9) leaves its claim behind:
the same command resumes it, keeping the tasks it finished; other settings are refused, as they would mix two
evaluations in one table. A finished run (no claim left) is replaced only with ``--overwrite true``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

SETTINGS = ("model", "precision", "split", "data_root", "eval_limit", "general_limit", "max_tokens")
"""What a resumed run must share with the interrupted one (the tasks may differ: each has its own folder)."""


def evaluate_tasks(tasks: list[str] | None = None, split: str = "val", model: str = "smollm2-135m",
                   precision: str = "fp32", data_root: str | None = None, eval_limit: int | None = None,
                   general_limit: int | None = None, output_dir: str = "runs/evaluate", overwrite: bool = False,
                   max_tokens: int = 1024) -> list[dict]:
    """Evaluate one model on several tasks, load it once, and print one table.

    The general set G does not depend on the task, so its NLL is computed once and shared. An interrupted run
    resumes when the same command is given again: the tasks it finished are kept, not evaluated again.

    Args:
        tasks: task names or task YAMLs (default: the six built-in tasks).
        split: ``val`` or ``test``.
        model: model name (see ``ModelConfig.name``).
        precision: ``bf16`` or ``fp32``.
        data_root: data folder (default: searched).
        eval_limit: first N examples of each task set.
        general_limit: first N texts of the general set.
        output_dir: results go to ``<output_dir>/<task>-<split>/``.
        overwrite: replace the results of a finished run (an interrupted one resumes without it).
        max_tokens: padded-token budget per batch.

    Returns:
        One row of metrics per task.
    """
    from editing.core.files import write_text
    from editing.core.types import Metric
    from editing.runs.records import EVALUATION_FILE, EvaluationRecord
    from editing.runs.tables import metrics_table

    settings = {"model": model, "precision": precision, "split": split, "data_root": data_root,
                "eval_limit": eval_limit, "general_limit": general_limit, "max_tokens": max_tokens}
    folder = Path(output_dir)
    modules, started, kept, claim = _claim_run(tasks, settings, folder, overwrite)
    start = time.time()
    module = _load_model(model, precision, start)
    general = _kept_general(kept)
    rows = []
    for task, (dm, out) in modules.items():
        if task in kept:
            rows.append(_row(dm.task.name, kept[task].counts["evaluation"], kept[task].metrics))
            continue
        t0 = time.time()
        row, general = _evaluate_task(module, dm, out, general, split, overwrite or started is not None)
        kept[task] = EvaluationRecord.read(out / EVALUATION_FILE)
        _keep_note(modules, kept, folder)
        rows.append(row)
        print(f"{dm.task.name}: success {row[Metric.SUCCESS_RATE]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    table = metrics_table(rows)
    write_text(folder / f"table-{split}.md", table + "\n", overwrite=True)
    claim.release()
    print(f"\n{model}, split {split}, precision {precision} ({time.time() - start:.0f}s in all)\n")
    print(table)
    return rows


def _claim_run(tasks: list[str] | None, settings: dict, folder: Path,
               overwrite: bool) -> tuple[dict[str, tuple[Any, Path]], str | None, dict[str, Any], Any]:
    """Check every task's data, then claim ``folder``: ``(modules, started, kept, claim)``.

    ``modules`` maps each task to its data module and output folder; ``started`` is when the interrupted run this one
    resumes started (None: none); ``kept`` holds the evaluation records that run finished (none with ``overwrite``).
    Results older than the interrupted run are a finished run's: they are refused without ``overwrite``.
    """
    from editing.core.files import ensure_writable
    from editing.data.datamodule import TaskDataModule
    from editing.rules.tasks import BUILTIN_TASKS
    from editing.runs.records import EVALUATION_FILE, EvaluationRecord
    from editing.runs.run_folder import claim_folder

    modules = {}
    for task in list(tasks or BUILTIN_TASKS):  # check every task's data before spending time on any
        dm = TaskDataModule(task=task, split=settings["split"], data_root=settings["data_root"],
                            eval_limit=settings["eval_limit"], general_limit=settings["general_limit"],
                            max_tokens=settings["max_tokens"])
        modules[task] = (dm, folder / f"{dm.task.name}-{settings['split']}")
    started = _interrupted_run(folder, settings, overwrite)
    kept = {task: EvaluationRecord.read(out / EVALUATION_FILE) for task, (dm, out) in modules.items()
            if started is not None and _written_since(out / EVALUATION_FILE, started)}
    if overwrite:
        kept = {}
    for task, (_dm, out) in modules.items():
        if task not in kept:
            ensure_writable(out / EVALUATION_FILE, overwrite)
    claim = claim_folder(folder, resuming=True, overwrite=False, flag="--overwrite true",
                         about={"evaluate": settings})
    _keep_note(modules, kept, folder)
    if kept:
        print(f"resuming the interrupted evaluation in {folder}: {len(kept)} of {len(modules)} tasks done "
              f"({', '.join(modules[t][0].task.name for t in kept)})", flush=True)
    return modules, started, kept, claim


def _keep_note(modules: dict, kept: dict, folder: Path) -> None:
    """Tell the interruption handler what an interruption now keeps: the tasks finished so far."""
    from editing.core import interruption

    names = [dm.task.name for task, (dm, _) in modules.items() if task in kept]
    done = f"the evaluations of {len(names)} of {len(modules)} tasks ({', '.join(names)})" if names else \
        "no finished task yet"
    interruption.keep(f"{done} in {folder}")


def _load_model(model: str, precision: str, start: float) -> Any:
    """The model, loaded once for every task (its load time counted from ``start``)."""
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    module = EditingModule(ModelConfig(name=model, precision=precision))
    print(f"loaded {model} ({module.identity['num_parameters']:,} parameters, {precision}) "
          f"in {time.time() - start:.1f}s", flush=True)
    return module


def _kept_general(kept: dict) -> dict | None:
    """The general set's NLL of a kept task (they all scored the same general set), so it is not computed again."""
    from editing.core.types import Metric

    for record in kept.values():
        return {Metric.GENERAL_NLL: record.metrics.general_nll,
                "general_tokens": record.counts.get("general_tokens"), "file": record.data_files.get("general")}
    return None


def _row(name: str, examples: int, metrics: Any) -> dict:
    """A task's row of the table: its name, its number of examples and the evaluated metrics."""
    from editing.core.types import EVALUATED_METRICS

    return {"task": name, "examples": examples, **{k.value: metrics[k] for k in EVALUATED_METRICS}}


def _evaluate_task(module: Any, dm: Any, out: Path, general: dict | None, split: str,
                   overwrite: bool) -> tuple[dict, dict]:
    """Evaluate one task and write its ``evaluation.json``: ``(its row, the general set's NLL)``.

    The general set is scored by the first task evaluated; the others take its NLL. ``overwrite``: replace what is
    there (an interrupted run may have left this task's scores file without its evaluation.json).
    """
    from editing.core.types import Metric, Stage
    from editing.evaluation import evaluate
    from editing.runs.records import write_evaluation

    roles = [r for r in dm.eval_roles() if r != "general" or general is None]
    summary = evaluate(module, dm, roles=roles, progress=True)
    if general is None:
        general = {Metric.GENERAL_NLL: summary[Metric.GENERAL_NLL],
                   "general_tokens": summary["counts"]["general_tokens"], "file": dm.describe().get("general")}
    else:
        summary[Metric.GENERAL_NLL] = general[Metric.GENERAL_NLL]
        summary["counts"]["general_tokens"] = general["general_tokens"]
    files = dm.describe()
    files.setdefault("general", general["file"])
    write_evaluation(out, summary, stage=Stage.VALIDATE if split == "val" else Stage.TEST, task=dm.task,
                     split=split, identity=module.identity, data_files=files, overwrite=overwrite)
    return _row(dm.task.name, summary["counts"]["evaluation"], summary), general


def _interrupted_run(folder: Path, settings: dict, overwrite: bool) -> str | None:
    """When ``folder`` holds an interrupted ``editing evaluate`` (a claim whose process is gone), the time it
    started; None when it holds none. A live run's claim is refused when this run claims the folder.

    Raises:
        ConfigError: the interrupted run had other settings (and ``overwrite`` was not given).
    """
    from editing.core.errors import ConfigError
    from editing.runs.run_folder import holder_alive, read_claim

    info = read_claim(folder)
    if info is None or holder_alive(info):
        return None
    theirs = (info.get("about") or {}).get("evaluate")
    if theirs != settings and not overwrite:
        if not isinstance(theirs, dict):
            differ = "its settings cannot be read"
        else:
            differ = "; ".join(f"{k}: {theirs.get(k)!r} there, {settings[k]!r} here" for k in SETTINGS
                               if theirs.get(k) != settings[k])
        raise ConfigError(f"{folder} holds an interrupted evaluate with other settings ({differ}): resume it with "
                          "the same settings, pass --overwrite true to start over, or choose another --output_dir")
    return str(info.get("started") or "")


def _written_since(path: Path, started: str) -> bool:
    """Whether ``path`` (an evaluation.json) was written by the run that started at ``started``, not before it."""
    from editing.core.errors import EditingError
    from editing.runs.records import EvaluationRecord

    if not path.is_file():
        return False
    try:
        return EvaluationRecord.read(path).created >= started
    except EditingError:
        return False

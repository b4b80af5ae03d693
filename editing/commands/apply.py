"""``editing apply``: saved edits applied to their base model and evaluated on a task, beside the base model.

One edit: its metrics next to the base model's, and the change. Several (``--edit A --edit B``): they are combined
by the rule of ``editing.edits.combine`` (different methods may not change one tensor; edits of one method add), and the
combined model is measured on each edit's task (beside the base model and that edit alone) and on the joint
degradation.
"""

from __future__ import annotations

from pathlib import Path

from editing.commands import DEFAULT_ROOT, repeatable


@repeatable("edit", "task")
def apply_edit(edit: str | list[str], task: str | list[str] | None = None, split: str = "val",
               data_root: str | None = None, eval_limit: int | None = None, general_limit: int | None = None,
               output_dir: str | None = None, overwrite: bool = False, allow_unverified: bool = False,
               alone: bool = True, chat_template: bool | str | None = None) -> dict:
    """Load a base model plus saved edits and evaluate them on a task, beside the base model.

    Args:
        edit: an edit folder (``<run>/edits/ball_<eps>``); repeat ``--edit`` to combine several (see the README's
            rule for combining).
        task: the task name or task YAML to evaluate on; with several edits, one ``--task`` per ``--edit`` in
            order (default: the task each edit was fitted on, read from its run's results.json).
        split: ``val`` or ``test``.
        data_root: data folder (default: searched).
        eval_limit: first N examples of the task sets.
        general_limit: first N texts of the general set.
        output_dir: where to write the results (default: ``<edit>/eval-<task>-<split>`` for one edit,
            ``runs/combined/version_N`` for several).
        overwrite: replace an earlier evaluation.
        allow_unverified: apply an edit saved without ``edit_manifest.json`` (by an older version), whose tensors
            cannot be checked against the hashes recorded at saving.
        alone: with several edits, also measure each edit by itself on its task.
        chat_template: ask the task's prefixes through a chat template (``--data.chat_template`` of ``editing
            fit``); default: the setting the (first) edit was fitted with, read from its run folder (false outside
            one).

    Returns:
        One edit: the evaluation summary. Several: the ``combined.json`` record as a dict.
    """
    from editing.core.errors import ConfigError
    from editing.edits.combine import edit_task, fitted_chat_template

    edits = [edit] if isinstance(edit, str) else list(edit or [])
    if not edits:
        raise ConfigError("give an edit folder: --edit <run>/edits/ball_<eps> (repeat --edit to combine several)")
    tasks = [task] if isinstance(task, str) else list(task or [])
    if not tasks:
        tasks = [edit_task(e) for e in edits]
    if chat_template is None:
        chat_template = fitted_chat_template(edits[0])
    if len(edits) == 1:
        if len(tasks) != 1:
            raise ConfigError(f"one --edit but {len(tasks)} --task options; evaluate on one task at a time")
        return _apply_one(edits[0], tasks[0], split, data_root, eval_limit, general_limit, output_dir, overwrite,
                          allow_unverified, chat_template)
    if len(tasks) == 1:
        tasks = tasks * len(edits)
    if len(tasks) != len(edits):
        raise ConfigError(f"{len(edits)} --edit options but {len(tasks)} --task options: give one --task per --edit "
                          "(in the same order), or one task for all")
    return _apply_several(edits, tasks, split, data_root, eval_limit, general_limit, output_dir, overwrite,
                          allow_unverified, alone, chat_template)


def _apply_one(edit: str, task: str, split: str, data_root: str | None, eval_limit: int | None,
               general_limit: int | None, output_dir: str | None, overwrite: bool, allow_unverified: bool,
               chat_template: bool | str = False) -> dict:
    from editing.core.types import Stage
    from editing.data.datamodule import TaskDataModule
    from editing.edits.load import load_edited
    from editing.evaluation import evaluate
    from editing.runs.records import write_evaluation

    module = load_edited(edit, allow_unverified=allow_unverified)
    dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                        general_limit=general_limit, chat_template=chat_template)
    out = Path(output_dir) if output_dir else Path(edit) / f"eval-{dm.task.name}-{split}"
    from editing.core.files import ensure_writable

    # refused before anything is computed (write_evaluation would refuse only after both evaluations)
    ensure_writable(out / "evaluation.json", overwrite, "--overwrite true")
    with module.reference():
        base = evaluate(module, dm, progress=True)
    summary = evaluate(module, dm, progress=True)
    path = write_evaluation(out, summary, stage=Stage.APPLY, task=dm.task, split=split, identity=module.identity,
                            data_files=dm.describe(), overwrite=overwrite)
    base_identity = {k: v for k, v in module.identity.items() if k not in ("edit", "edit_sha256")}
    write_evaluation(out / "base", base, stage=Stage.APPLY, task=dm.task, split=split, identity=base_identity,
                     data_files=dm.describe(), overwrite=overwrite)
    print(f"{dm.task.name} ({split}, {summary['counts']['evaluation']} examples), edit {edit} ({module.edit_kind}):")
    print(change_table(base, summary))
    print(f"results: {path} (the base model's: {out / 'base'})")
    return summary


def change_table(base: dict, edited: dict) -> str:
    """Per metric: the base model's value, the edited model's, and the change (the degradation for the general
    NLL: its relative change)."""
    from editing.core.types import EVALUATED_METRICS, Metric
    from editing.rules.budget import degradation
    from editing.runs.tables import markdown_table

    rows = []
    for metric in EVALUATED_METRICS:
        b, e = base.get(metric), edited.get(metric)
        rows.append((metric.value, _num(b), _num(e), "-" if b is None or e is None else f"{e - b:+.6g}"))
    b, e = base.get(Metric.GENERAL_NLL), edited.get(Metric.GENERAL_NLL)
    if b is not None and e is not None:
        rows.append((Metric.DEGRADATION.value, "0", f"{degradation(e, b):.6g}", f"{degradation(e, b):+.6g}"))
    return markdown_table(("metric", "base", "edited", "change"), rows)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _apply_several(edits: list[str], tasks: list[str], split: str, data_root: str | None, eval_limit: int | None,
                   general_limit: int | None, output_dir: str | None, overwrite: bool, allow_unverified: bool,
                   alone: bool, chat_template: bool | str = False) -> dict:
    from editing.core.files import ensure_writable
    from editing.edits.combine import combine_edits, evaluate_combined, write_combined
    from editing.runs.tables import markdown_table

    out = Path(output_dir) if output_dir else _next_version(Path(DEFAULT_ROOT) / "combined")
    ensure_writable(out / "combined.json", overwrite, "--overwrite true")
    module, parts = combine_edits(edits, allow_unverified=allow_unverified)
    record = evaluate_combined(module, parts, tasks, split, data_root, eval_limit, general_limit, alone=alone,
                               progress=True, chat_template=chat_template)
    path = write_combined(out, record, overwrite=overwrite)
    print(f"{len(parts)} edits combined on {module.identity['name']}: "
          + ", ".join(f"{p.folder} ({p.method})" for p in parts))
    print(markdown_table(
        ("task", "edit", "success base", "success alone", "success combined", "change (pp)"),
        ((t.task, t.edit, _num(t.base.success_rate), "-" if t.alone is None else _num(t.alone.success_rate),
          _num(t.combined.success_rate), _pp(t.base.success_rate, t.combined.success_rate)) for t in record.tasks)))
    print(f"joint degradation (general NLL of the combined model vs the base model): "
          f"{_num(record.joint_degradation)} ({_num(record.base_general_nll)} -> {_num(record.combined_general_nll)})")
    print(f"results: {path}")
    return record.to_dict()


def _pp(before: float | None, after: float | None) -> str:
    from editing.rules.budget import success_change_pp

    return "-" if before is None or after is None else f"{success_change_pp(before, after):+.1f}"


def _next_version(root: Path) -> Path:
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"

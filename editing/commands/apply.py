"""``editing apply``: a saved edit applied to its base model and evaluated on a task."""

from __future__ import annotations

from pathlib import Path


def apply_edit(edit: str, task: str = "country_capital", split: str = "val", data_root: str | None = None,
               eval_limit: int | None = None, general_limit: int | None = None, output_dir: str | None = None,
               overwrite: bool = False, allow_unverified: bool = False) -> dict:
    """Load a base model plus a saved edit and evaluate it on a task.

    Args:
        edit: an edit folder (``<run>/edits/ball_<eps>``).
        task: task name or task YAML.
        split: ``val`` or ``test``.
        data_root: data folder (default: searched).
        eval_limit: first N examples of the task sets.
        general_limit: first N texts of the general set.
        output_dir: where to write ``evaluation.json`` (default: ``<edit>/eval-<task>-<split>``).
        overwrite: replace an earlier evaluation.
        allow_unverified: apply an edit saved without ``edit_manifest.json`` (by an older version), whose tensors
            cannot be checked against the hashes recorded at saving.

    Returns:
        The evaluation summary.
    """
    from editing.data.datamodule import TaskDataModule
    from editing.edits import load_edited
    from editing.evaluation import evaluate
    from editing.records import write_evaluation
    from editing.tables import metrics_table
    from editing.types import EVALUATED_METRICS, Stage

    module = load_edited(edit, allow_unverified=allow_unverified)
    dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                        general_limit=general_limit)
    summary = evaluate(module, dm, progress=True)
    out = Path(output_dir) if output_dir else Path(edit) / f"eval-{dm.task.name}-{split}"
    path = write_evaluation(out, summary, stage=Stage.APPLY, task=dm.task, split=split, identity=module.identity,
                            data_files=dm.describe(), overwrite=overwrite)
    print(metrics_table([{"task": dm.task.name, "examples": summary["counts"]["evaluation"],
                          **{k.value: summary[k] for k in EVALUATED_METRICS}}]))
    print(f"results: {path}")
    return summary

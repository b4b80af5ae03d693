"""``editing evaluate``: one model on several tasks, loaded once, one table."""

from __future__ import annotations

import time
from pathlib import Path


def evaluate_tasks(tasks: list[str] | None = None, split: str = "val", model: str = "smollm2-135m",
                   precision: str = "fp32", data_root: str | None = None, eval_limit: int | None = None,
                   general_limit: int | None = None, output_dir: str = "runs/evaluate", overwrite: bool = False,
                   max_tokens: int = 1024) -> list[dict]:
    """Evaluate one model on several tasks, load it once, and print one table.

    The general set G does not depend on the task, so its NLL is computed once and shared.

    Args:
        tasks: task names or task YAMLs (default: the six built-in tasks).
        split: ``val`` or ``test``.
        model: model name (see ``ModelConfig.name``).
        precision: ``bf16`` or ``fp32``.
        data_root: data folder (default: searched).
        eval_limit: first N examples of each task set.
        general_limit: first N texts of the general set.
        output_dir: results go to ``<output_dir>/<task>-<split>/``.
        overwrite: replace results of an earlier run.
        max_tokens: padded-token budget per batch.

    Returns:
        One row of metrics per task.
    """
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate
    from editing.files import ensure_writable, write_text
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig
    from editing.records import EVALUATION_FILE, write_evaluation
    from editing.tables import metrics_table
    from editing.tasks import BUILTIN_TASKS
    from editing.types import EVALUATED_METRICS, Metric, Stage

    tasks = list(tasks or BUILTIN_TASKS)
    start = time.time()
    module = EditingModule(ModelConfig(name=model, precision=precision))
    print(f"loaded {model} ({module.identity['num_parameters']:,} parameters, {precision}) "
          f"in {time.time() - start:.1f}s", flush=True)
    modules = {}
    for task in tasks:  # check every task's data before spending time on any
        dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                            general_limit=general_limit, max_tokens=max_tokens)
        out = Path(output_dir) / f"{dm.task.name}-{split}"
        ensure_writable(out / EVALUATION_FILE, overwrite)
        modules[task] = (dm, out)
    general: dict | None = None
    rows = []
    for dm, out in modules.values():
        t0 = time.time()
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
        row = {"task": dm.task.name, "examples": summary["counts"]["evaluation"],
               **{k.value: summary[k] for k in EVALUATED_METRICS}}
        rows.append(row)
        print(f"{dm.task.name}: success {row[Metric.SUCCESS_RATE]:.3f} ({time.time() - t0:.0f}s)", flush=True)
    table = metrics_table(rows)
    write_text(Path(output_dir) / f"table-{split}.md", table + "\n", overwrite=True)
    print(f"\n{model}, split {split}, precision {precision} ({time.time() - start:.0f}s in all)\n")
    print(table)
    return rows

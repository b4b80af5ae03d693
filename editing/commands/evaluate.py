"""``editing evaluate``: one model on several tasks, loaded once, one table."""

from __future__ import annotations

import time
from pathlib import Path


def results_table(rows: list[dict]) -> str:
    headers = ["task", "success rate", "general NLL", "targeted NLL", "hard-neg NLL", "examples"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r['task']} | {fmt(r['success_rate'], '.3f')} | {fmt(r['general_nll'], '.5f')} | "
            f"{fmt(r['targeted_nll'], '.4f')} | {fmt(r['hard_negative_nll'], '.4f')} | {r['examples']} |"
        )
    return "\n".join(lines)


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
    from editing.methods.base import EditingModule, evaluate
    from editing.models.loading import ModelConfig
    from editing.report_files import write_evaluation
    from editing.results import ensure_writable
    from editing.tasks import BUILTIN_TASKS

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
        ensure_writable(out / "evaluation.json", overwrite)
        modules[task] = (dm, out)
    general: dict | None = None
    rows = []
    for dm, out in modules.values():
        t0 = time.time()
        roles = [r for r in dm.eval_roles() if r != "general" or general is None]
        summary = evaluate(module, dm, roles=roles, progress=True)
        if general is None:
            general = {"general_nll": summary["general_nll"], "general_tokens": summary["counts"]["general_tokens"],
                       "file": dm.describe().get("general")}
        else:
            summary["general_nll"] = general["general_nll"]
            summary["counts"]["general_tokens"] = general["general_tokens"]
        files = dm.describe()
        files.setdefault("general", general["file"])
        write_evaluation(out, summary, stage="validate" if split == "val" else "test", task=dm.task, split=split,
                         identity=module.identity, data_files=files, overwrite=overwrite)
        row = {"task": dm.task.name, "examples": summary["counts"]["evaluation"],
               **{k: summary[k] for k in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll")}}
        rows.append(row)
        print(f"{dm.task.name}: success {row['success_rate']:.3f} ({time.time() - t0:.0f}s)", flush=True)
    table = results_table(rows)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / f"table-{split}.md").write_text(table + "\n")
    print(f"\n{model}, split {split}, precision {precision} ({time.time() - start:.0f}s in all)\n")
    print(table)
    return rows

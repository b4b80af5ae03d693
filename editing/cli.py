"""The ``editing`` command: LightningCLI (fit, validate, test) plus ``evaluate``, ``apply``, ``data download`` and the
protocol commands ``sweep``, ``sweep-status``, ``select``, ``test-runs`` and ``report``."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import ArgumentParser, lazy_instance
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from editing.errors import EditingError

# While fitting, evaluation runs in the DegradationBudget callback, so the fit loop has no val dataloaders on purpose.
warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")

EXTRA_COMMANDS = ("evaluate", "data", "apply", "sweep", "sweep-status", "select", "test-runs", "report")
TRAINER_DEFAULTS = {
    "use_distributed_sampler": False,
    "max_epochs": 10,
    "num_sanity_val_steps": 0,
    "logger": lazy_instance(CSVLogger, save_dir="runs", name="fit"),
}


class FitConfigSaver(SaveConfigCallback):
    """Saves the resolved config into the run folder of ``fit`` runs (validate/test put it in their JSON)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.config.get("ckpt_path"):
            self.overwrite = True  # resuming continues the same run, whose config this is
        super().setup(trainer, pl_module, stage)


class EditingCLI(LightningCLI):
    """LightningCLI with the project's defaults: any editing method as the model (``--model LoRAEditor``; the
    default is the unedited ``EditingModule``), the degradation budget while fitting, results files after
    validate/test, and no duplicated examples under DDP (our batch sampler shards by rank itself)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no predict: editing has nothing to generate
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        from callbacks.degradation_budget import DegradationBudget
        from callbacks.evaluation_report import EvaluationReport

        parser.add_lightning_class_args(EvaluationReport, "report")
        parser.add_lightning_class_args(DegradationBudget, "budget")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.set_defaults({"model": {"class_path": "editing.methods.base.EditingModule"}})

    def _attach_config(self) -> None:
        from callbacks.degradation_budget import DegradationBudget
        from callbacks.evaluation_report import EvaluationReport

        resolved = json.loads(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False,
                                                                  format="json"))
        for callback in self.trainer.callbacks:
            if isinstance(callback, (EvaluationReport, DegradationBudget)):
                callback.resolved_config = resolved

    def before_fit(self) -> None:
        self._attach_config()

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()


def run_lightning_cli(args: list[str] | None) -> None:
    """``editing validate|test`` through LightningCLI."""
    from editing.data.datamodule import TaskDataModule
    from editing.methods.base import EditingModule

    EditingCLI(
        EditingModule,
        TaskDataModule,
        subclass_mode_model=True,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=FitConfigSaver,
        parser_kwargs={"description": "canonical-editing: edit language models from canonical examples. "
                                      "LightningCLI commands below; also `editing evaluate` (several tasks, one "
                                      "table), `editing apply` (evaluate a saved edit), `editing data download`, and "
                                      "the protocol: `editing sweep|sweep-status|select|test-runs|report`."},
    )


def _table(rows: list[dict]) -> str:
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
    table = _table(rows)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / f"table-{split}.md").write_text(table + "\n")
    print(f"\n{model}, split {split}, precision {precision} ({time.time() - start:.0f}s in all)\n")
    print(table)
    return rows


def download_data(root: str | None = None, base_url: str | None = None, overwrite: bool = False) -> None:
    """Download the six tasks' files and the general sets from the paper's public repository.

    Args:
        root: destination (default: the cache folder searched by default).
        base_url: the repository's raw ``data/`` URL (a mirror or a ``file://`` folder works too).
        overwrite: replace files already there.
    """
    from editing.data.download import DEFAULT_BASE_URL, download

    download(root=root, base_url=base_url or DEFAULT_BASE_URL, overwrite=overwrite)


def apply_edit(edit: str, task: str = "country_capital", split: str = "val", data_root: str | None = None,
               eval_limit: int | None = None, general_limit: int | None = None, output_dir: str | None = None,
               overwrite: bool = False) -> dict:
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

    Returns:
        The evaluation summary.
    """
    from editing.data.datamodule import TaskDataModule
    from editing.edits import load_edited
    from editing.methods.base import evaluate
    from editing.report_files import write_evaluation

    module = load_edited(edit)
    dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                        general_limit=general_limit)
    summary = evaluate(module, dm, progress=True)
    out = Path(output_dir) if output_dir else Path(edit) / f"eval-{dm.task.name}-{split}"
    path = write_evaluation(out, summary, stage="apply", task=dm.task, split=split, identity=module.identity,
                            data_files=dm.describe(), overwrite=overwrite)
    print(_table([{"task": dm.task.name, "examples": summary["counts"]["evaluation"],
                   **{k: summary[k] for k in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll")}}]))
    print(f"results: {path}")
    return summary


def _protocol_commands() -> dict[str, tuple]:
    """The protocol commands: name -> (function, help)."""
    from editing import report, sweep

    return {
        "sweep": (sweep.run_sweep, "random search on the validation pair (one worker; start several to share it)"),
        "sweep-status": (sweep.sweep_status, "a sweep's progress: trials done, running, failed; best per ball"),
        "select": (sweep.select, "the best validation configuration and epoch per ball"),
        "test-runs": (sweep.test_runs, "rerun the selected configurations on the test pair with several seeds"),
        "report": (report.make_report, "tables (Markdown, LaTeX) and plots (PNG) from the test runs"),
    }


def run_extra(args: list[str]) -> None:
    """``editing evaluate``, ``apply``, ``data download`` and the protocol commands."""
    parser = ArgumentParser(prog="editing", description="canonical-editing commands besides fit/validate/test")
    sub = parser.add_subcommands()
    ev = ArgumentParser(description="Evaluate a model on several tasks and print one table.")
    ev.add_function_arguments(evaluate_tasks)
    sub.add_subcommand("evaluate", ev, help="evaluate a model on several tasks (one table)")
    ap = ArgumentParser(description="Apply a saved edit to its base model and evaluate it.")
    ap.add_function_arguments(apply_edit)
    sub.add_subcommand("apply", ap, help="apply a saved edit and evaluate it")
    data = ArgumentParser(description="Task data commands.")
    sub.add_subcommand("data", data, help="task data commands")
    data_sub = data.add_subcommands()
    dl = ArgumentParser(description="Download the task data from the paper's public repository.")
    dl.add_function_arguments(download_data)
    data_sub.add_subcommand("download", dl, help="download the task data")
    protocol = _protocol_commands()
    for name, (func, help_text) in protocol.items():
        p = ArgumentParser(description=(func.__doc__ or help_text).split("\n\n")[0])
        p.add_function_arguments(func, skip={"runner"})
        sub.add_subcommand(name, p, help=help_text)
    cfg = parser.parse_args(args)
    if cfg.subcommand == "evaluate":
        evaluate_tasks(**{k: v for k, v in cfg.evaluate.items() if k != "config"})
    elif cfg.subcommand == "apply":
        apply_edit(**{k: v for k, v in cfg.apply.items() if k != "config"})
    elif cfg.subcommand in protocol:
        func = protocol[cfg.subcommand][0]
        func(**{k: v for k, v in cfg[cfg.subcommand].items() if k != "config"})
    else:
        download_data(**{k: v for k, v in cfg.data.download.items() if k != "config"})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``editing`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in EXTRA_COMMANDS:
            run_extra(args)
        else:
            run_lightning_cli(None if argv is None else args)
    except Exception as err:  # noqa: BLE001 - only our own errors are turned into messages, others re-raise
        cause = _editing_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _editing_error(err: BaseException | None) -> EditingError | None:
    """The user-facing error behind ``err`` (jsonargparse wraps errors raised while building classes)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, EditingError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()

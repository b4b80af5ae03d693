"""The ``editing`` command: LightningCLI (fit, validate, test) plus ``evaluate``, ``apply``, ``data download``,
``senses inspect``, ``ensemble``, ``backpack distill|export`` and the protocol commands ``sweep``, ``sweep-status``,
``select``, ``test-runs`` and ``report``."""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

from jsonargparse import ActionConfigFile, lazy_instance
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger

from editing.checkpoints import SafeCheckpointsMixin
from editing.cli_errors import ArgumentParser, EditingArgumentParser
from editing.errors import ConfigError, EditingError

# While fitting, evaluation runs in the DegradationBudget callback, so the fit loop has no val dataloaders on purpose.
warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
# Lightning warns that a mid-epoch resume replays the epoch unless the loader is stateful; the DataModules resume
# their loader's place in the epoch through their own checkpoint state instead, so the warning does not apply
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

EXTRA_COMMANDS = ("evaluate", "data", "apply", "senses", "ensemble", "sweep", "sweep-status", "select", "test-runs",
                  "report")
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
        budget = self.config.get("budget") or {}
        if self.config.get("ckpt_path") or budget.get("overwrite"):
            # resuming continues the same run, whose config this is; --budget.overwrite replaces the run, config too
            self.overwrite = True
        try:
            super().setup(trainer, pl_module, stage)
        except RuntimeError as err:
            if "to NOT exist" not in str(err):
                raise
            from editing.run_folder import RunFolderError

            config = Path(trainer.log_dir) / self.config_filename
            raise RunFolderError(f"{config} exists: that folder holds another run. Resume it with --ckpt_path last, "
                                 "choose another logger version or folder, or pass --budget.overwrite true") from None


class EditingCLI(SafeCheckpointsMixin, LightningCLI):
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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would parse the hyperparameters stored in a --ckpt_path FILE as the model's init arguments,
        # which ours are not (they describe the run), so an explicit path never resumed. The command line defines
        # the run; the file is checked here and against the run before the fit starts (_prepare_run_folders).
        self._check_ckpt_file()

    def before_fit(self) -> None:
        self._attach_config()
        self._prepare_run_folders()

    def _prepare_run_folders(self) -> None:
        """Before the fit touches any file: resolve and check the checkpoint to resume, claim the run folders
        (refusing a fit that would clobber another run, or that cannot write), and keep the metrics log of a run
        being resumed. A fit refused here has changed nothing on disk."""
        from lightning.pytorch.loggers import CSVLogger

        from callbacks.degradation_budget import DegradationBudget
        from editing.metrics_log import keep_metrics_log

        trainer = self.trainer
        config = self.config_init[self.subcommand]
        path = _resolve_ckpt_path(trainer, config.get("ckpt_path"))
        restarting = config.get("ckpt_path") == "last" and path is None
        if path is not None:
            self.model.check_checkpoint(_read_checkpoint(path), str(path))
            config["ckpt_path"] = str(path)  # resume the very file that was checked
        elif restarting:
            config["ckpt_path"] = None
        resuming = bool(config.get("ckpt_path"))
        budget = next((cb for cb in trainer.callbacks if isinstance(cb, DegradationBudget)), None)
        if budget is None or not _launching_process():
            return
        budget.claim_run_folder(trainer, resuming, also=(Path(trainer.log_dir),), restarting=restarting)
        if resuming:
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    keep_metrics_log(logger)

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()


def _launching_process() -> bool:
    """Whether this is the process that starts the fit (global rank 0). Before the fit the trainer's ranks are not
    set yet (every DDP process reads as rank 0), so they are read from the environment the launcher sets."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0


def _resolve_ckpt_path(trainer, ckpt_path: str | None) -> Path | None:
    """The checkpoint file ``--ckpt_path`` means: ``last`` is the newest ``last*.ckpt`` where the run's
    ModelCheckpoint writes (None when there is none: the fit starts afresh, as Lightning does); other keywords
    (``best``, ``hpc``) are left to Lightning (None)."""
    from editing.errors import ConfigError

    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        folders = {Path(cb.dirpath) if cb.dirpath else Path(trainer.log_dir) / "checkpoints"
                   for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)}
        found = [f for folder in folders for f in folder.glob("last*.ckpt") if f.is_file()]
        if not found:
            print(f"--ckpt_path last: no last.ckpt in {', '.join(map(str, sorted(folders))) or 'any folder'}; "
                  "starting a new run", file=sys.stderr)
            return None
        return max(found, key=lambda f: f.stat().st_mtime)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file; give the path of a .ckpt file "
                          "(e.g. <run>/checkpoints/last.ckpt) or `last`")
    return path


def _read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, checked for integrity and loaded without unpickling code."""
    from editing.checkpoints import CKPT_PATH_FIX, load_checkpoint_file

    return load_checkpoint_file(path, fix=CKPT_PATH_FIX)


def run_lightning_cli(args: list[str] | None) -> None:
    """``editing fit|validate|test`` through LightningCLI."""
    from editing.data.datamodule import TaskDataModule
    from editing.methods.base import EditingModule

    EditingCLI(
        EditingModule,
        TaskDataModule,
        subclass_mode_model=True,
        args=args,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=FitConfigSaver,
        parser_class=EditingArgumentParser,
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
    from editing.evaluation import evaluate
    from editing.methods.base import EditingModule
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
    from editing.report_files import write_evaluation

    module = load_edited(edit, allow_unverified=allow_unverified)
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


def inspect_senses(edit: str, top: int = 5, limit: int | None = 30, allow_unverified: bool = False) -> list[dict]:
    """List the senses a sense edit changed: token, sense index, importance, and the words the sense vector scores
    highest before and after the edit.

    Args:
        edit: a sense edit folder (``<run>/edits/ball_<eps>``).
        top: words per sense, before and after.
        limit: show the N senses that changed most (null: all).
        allow_unverified: read an edit saved without ``edit_manifest.json`` (by an older version).

    Returns:
        The rows of the table.
    """
    from editing.edits import load_edited
    from editing.methods.senses.inspect import format_inspection, inspect_edit

    rows = inspect_edit(load_edited(edit, allow_unverified=allow_unverified), top=top, limit=limit)
    print(format_inspection(rows))
    return rows


def run_ensemble(large: str, backpack_edits: str, task: str = "country_capital", split: str = "val",
                 large_tokenizer: str | None = None, data_root: str | None = None, eval_limit: int | None = None,
                 general_limit: int | None = None, balls: list[float] | None = None,
                 output_dir: str = "runs/ensemble", overwrite: bool = False, max_tokens: int = 1024,
                 allow_unverified: bool = False) -> dict:
    """Carry a Backpack's edit to a larger model with the same tokenizer: per ball, beta from 1.0 down in steps of
    0.1 until the ensemble's general NLL is inside the ball, then its evaluation (SPEC section 9).

    Args:
        large: the large model (see ``ModelConfig.name``).
        backpack_edits: a senses fit run folder (its ``edits/ball_<eps>``) or one Backpack edit folder.
        task: task name or task YAML.
        split: ``val`` or ``test``.
        large_tokenizer: override the large model's tokenizer (``gpt2`` for GPT-J offline).
        data_root: data folder (default: searched).
        eval_limit: first N examples of each task set.
        general_limit: first N texts of the general set.
        balls: eps values, each finite with 0 < eps < 1 and listed once (default 1e-3, 1e-4, 1e-5).
        output_dir: results go to ``<output_dir>/results.json``.
        overwrite: replace an earlier result there.
        max_tokens: padded-token budget per batch.
        allow_unverified: use Backpack edits saved without ``edit_manifest.json`` (by an older version).

    Returns:
        The results written.
    """
    from editing.budget import ball_key, parse_balls
    from editing.data.datamodule import TaskDataModule
    from editing.edits import load_edited
    from editing.ensemble_search import edit_folders, search
    from editing.models.loading import ModelConfig, load_model
    from editing.results import ensure_writable, write_json

    balls = parse_balls(balls, "--balls")
    target = Path(output_dir) / "results.json"
    ensure_writable(target, overwrite)
    folders = edit_folders(backpack_edits, balls)
    large_model = load_model(ModelConfig(name=large, tokenizer=large_tokenizer))
    backpacks = {key: load_edited(folder, allow_unverified=allow_unverified) for key, folder in folders.items()}
    dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                        general_limit=general_limit, max_tokens=max_tokens)
    started = time.time()
    found = search(large_model, backpacks, dm, balls)
    initial = found["initial"]
    summary = {"method": "ensemble", "task": dm.task.name, "split": split, "large": large_model.identity,
               "backpack_edits": {k: str(v) for k, v in folders.items()}, "vocab": found["vocab"],
               "initial": {k: v for k, v in initial.items() if k != "per_example"}, "balls": {},
               "seconds": round(time.time() - started, 1)}
    print("| ball | beta | success before | success after | change (pp) | general NLL x |")
    print("|---|---|---|---|---|---|")
    for eps in balls:
        key = ball_key(eps)
        entry = found["balls"][key]
        m = entry["metrics"]
        ratio = m["general_nll"] / initial["general_nll"]
        summary["balls"][key] = {"beta": entry["beta"], "general_nll_by_beta": entry["general_nll_by_beta"],
                                 "success_before": initial["success_rate"], "success_after": m["success_rate"],
                                 "success_change": m["success_rate"] - initial["success_rate"],
                                 "general_nll": m["general_nll"], "degradation": ratio - 1,
                                 "metrics": {k: v for k, v in m.items() if k != "per_example"}}
        print(f"| {key} | {entry['beta']:.1f} | {initial['success_rate']:.3f} | {m['success_rate']:.3f} | "
              f"{100 * (m['success_rate'] - initial['success_rate']):+.1f} | {ratio:.6f} |")
    write_json(target, summary)
    print(f"results: {target}")
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
    senses = ArgumentParser(description="Sense edit commands.")
    sub.add_subcommand("senses", senses, help="sense edit commands")
    senses_sub = senses.add_subcommands()
    ins = ArgumentParser(description="List what a sense edit changed (figure 4 of the paper).")
    ins.add_function_arguments(inspect_senses)
    senses_sub.add_subcommand("inspect", ins, help="list the senses an edit changed")
    ens = ArgumentParser(description="Ensemble a larger model with a Backpack edit; beta searched per ball.")
    ens.add_argument("--config", action=ActionConfigFile, help="a YAML of these settings (lightning_configs/ensemble)")
    ens.add_function_arguments(run_ensemble)
    sub.add_subcommand("ensemble", ens, help="carry a Backpack edit to a larger model")
    protocol = _protocol_commands()
    for name, (func, help_text) in protocol.items():
        p = ArgumentParser(description=(func.__doc__ or help_text).split("\n\n")[0])
        p.add_function_arguments(func, skip={"runner"})
        sub.add_subcommand(name, p, help=help_text)
    cfg = parser.parse_args(args)
    if cfg.subcommand == "senses":
        inspect_senses(**{k: v for k, v in cfg.senses.inspect.items() if k != "config"})
    elif cfg.subcommand == "ensemble":
        run_ensemble(**{k: v for k, v in cfg.ensemble.items() if k != "config"})
    elif cfg.subcommand == "evaluate":
        evaluate_tasks(**{k: v for k, v in cfg.evaluate.items() if k != "config"})
    elif cfg.subcommand == "apply":
        apply_edit(**{k: v for k, v in cfg.apply.items() if k != "config"})
    elif cfg.subcommand in protocol:
        func = protocol[cfg.subcommand][0]
        func(**{k: v for k, v in cfg[cfg.subcommand].items() if k != "config"})
    else:
        download_data(**{k: v for k, v in cfg.data.download.items() if k != "config"})


class SaveOnInterrupt(OnExceptionCheckpoint):
    """Writes ``interrupted.ckpt`` beside the run's other checkpoints when a fit stops on an exception (Ctrl-C)."""

    def __init__(self) -> None:
        super().__init__(dirpath=".", filename="interrupted")

    def on_fit_start(self, trainer, pl_module) -> None:
        checkpoint = _last_checkpoint(trainer)
        if checkpoint is not None:
            self.dirpath = checkpoint.dirpath


def _last_checkpoint(trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps ``last.ckpt`` (``trainer.checkpoint_callback`` may be another Checkpoint)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            return callback
    return None


class SaveLastOnStop(Checkpoint):
    """Brings ``last.ckpt`` up to date when a run is told to stop between periodic checkpoints (``max_time``,
    a callback setting ``should_stop``), so that ``--ckpt_path last`` resumes from the final step rather than from
    the last multiple of ``every_n_train_steps``.

    It saves at the end of that training batch, like the periodic checkpoints, so the resumed run continues the same
    epoch (saving in ``on_train_end`` would record the epoch as finished). Being a ``Checkpoint``, Lightning runs it
    after the other callbacks, the Timer included, so it sees their ``should_stop``.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        checkpoint = _last_checkpoint(trainer)
        if not trainer.should_stop or checkpoint is None or checkpoint._last_global_step_saved == trainer.global_step:
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        checkpoint._last_global_step_saved = trainer.global_step
        checkpoint.last_model_path = path


def run_distill_cli(args: list[str]) -> None:
    """``editing backpack distill``: a Lightning fit of ``BackpackDistillation`` on a ``CorpusDataModule``."""
    from editing.data.corpus import CorpusDataModule
    from editing.models.backpack.distill import BackpackDistillation

    class DistillCLI(SafeCheckpointsMixin, LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0,
                                 "checkpoint.every_n_train_steps": 25})

    # an interrupted run (Ctrl-C, a crash) still leaves its latest state: `editing backpack export` turns it into
    # a model folder, `--ckpt_path` resumes it
    # Lightning warns that a mid-epoch resume replays the epoch unless the loader is stateful; ours resumes through
    # the DataModule's checkpoint state instead (CorpusDataModule.load_state_dict), so the warning does not apply
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    DistillCLI(BackpackDistillation, CorpusDataModule, args=["fit", *args], save_config_callback=FitConfigSaver,
               parser_class=EditingArgumentParser,
               trainer_defaults={"max_epochs": 1, "num_sanity_val_steps": 0,
                                 # the corpus sampler shards by rank itself and restores its place in the epoch
                                 "use_distributed_sampler": False,
                                 "callbacks": [SaveOnInterrupt(), SaveLastOnStop()],
                                 "logger": lazy_instance(CSVLogger, save_dir="runs", name="distill")})


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``editing`` command."""
    args = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.argv[1:] = args  # LightningCLI reads sys.argv itself
    try:
        check_arguments(args)
        if args[:2] == ["backpack", "distill"]:
            run_distill_cli(args[2:])
        elif args[:2] == ["backpack", "export"]:
            from editing.models.backpack.distill import export_checkpoint

            parser = ArgumentParser(prog="editing backpack export",
                                    description="Write the Backpack of a distillation checkpoint as a model folder.")
            parser.add_function_arguments(export_checkpoint)
            cfg = parser.parse_args(args[2:])
            print(export_checkpoint(**{k: v for k, v in cfg.items() if k != "config"}))
        elif args and args[0] in EXTRA_COMMANDS:
            run_extra(args)
        else:
            run_lightning_cli(None if argv is None else args)
    except Exception as err:  # noqa: BLE001 - only our own errors are turned into messages, others re-raise
        cause = _editing_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join_negative_values(args: list[str]) -> list[str]:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a negative number in exponent notation for an option and
    then reports a confusing "expected one argument" about another option."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if (arg.startswith("--") and "=" not in arg and i + 1 < len(args)
                and NEGATIVE_NUMBER.fullmatch(args[i + 1])):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def _option_values(args: list[str], option: str) -> list[str]:
    """The values given to ``option`` on a command line (``--option VALUE`` or ``--option=VALUE``)."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg[len(option) + 1:])
    return values


def check_arguments(args: list[str]) -> None:
    """Checks of the raw command line whose failures jsonargparse reports without naming the file or the choices:
    a ``--config`` file that is not UTF-8 or not valid YAML (file and line), and an unknown ``--model`` class."""
    from editing.textfiles import load_yaml

    commands = ("fit", "validate", "test", "backpack", *EXTRA_COMMANDS)
    if args and not args[0].startswith("-") and args[0] not in commands:
        import difflib

        close = difflib.get_close_matches(args[0], commands, n=1)
        raise ConfigError(f"unknown command {args[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; the commands are {', '.join(commands)} (`editing --help`)")
    if args[:1] == ["backpack"] and args[1:2] not in (["distill"], ["export"]):
        raise ConfigError("`editing backpack` takes a command: distill or export (e.g. `editing backpack distill "
                          "--help`)")
    for path in _option_values(args, "--config"):
        if Path(path).is_file():
            load_yaml(path, "config file")
    if args and args[0] in ("fit", "validate", "test"):
        for value in _option_values(args, "--model"):
            _check_model_class(value)


def _check_model_class(value: str) -> None:
    """An unknown ``--model`` class gets the list of methods (jsonargparse says only "expected a dot import path")."""
    import importlib
    import inspect

    if not re.fullmatch(r"[A-Za-z_][\w.]*", value) or value.endswith((".yaml", ".yml", ".json")):
        return  # a config file or an inline YAML/JSON value: jsonargparse checks those itself
    from editing import methods
    from editing.methods.base import EditingModule

    known = sorted(n for n in methods.__all__
                   if inspect.isclass(getattr(methods, n)) and issubclass(getattr(methods, n), EditingModule))
    if value in known:
        return
    if "." in value:
        module_name, _, class_name = value.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name, None)
        except ImportError:
            cls = None
        if inspect.isclass(cls) and issubclass(cls, EditingModule):
            return
    raise ConfigError(f"--model {value!r} is not an editing method; use one of {', '.join(known)} "
                      "(e.g. --model LoRAEditor) or the dotted import path of an EditingModule subclass")


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

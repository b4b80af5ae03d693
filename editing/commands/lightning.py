"""``editing fit``, ``validate`` and ``test``: LightningCLI with the project's defaults, and what every LightningCLI
command of the project shares (``ProjectCLI``: concise errors, ``--trainer.default_root_dir``, a short ``--help``;
the checkpoint callbacks; the config saver). ``editing backpack distill`` builds on it in ``backpack.py``."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import sys
import threading
import typing
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import is_dataclass
from pathlib import Path

from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from editing.commands import DEFAULT_ROOT, parses_own_arguments
from editing.commands.parsing import ClearErrorsMixin
from editing.commands.practitioner import SMALL_DATA_HELP, SMALL_DATA_OPTION, apply_small_data
from editing.core import interruption
from editing.core.errors import ConfigError
from editing.runs.checkpoints import SafeCheckpointsMixin

# While fitting, evaluation runs in the DegradationBudget callback, so the fit loop has no val dataloaders on purpose.
warnings.filterwarnings("ignore", message=r"Total length of .* across ranks is zero")
# Lightning warns that a mid-epoch resume replays the epoch unless the loader is stateful; the DataModules resume
# their loader's place in the epoch through their own checkpoint state instead, so the warning does not apply
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# The command table hands LightningCLI its arguments explicitly (sys.argv also holds the command's name)
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")

TRAINER_DEFAULTS = {
    "use_distributed_sampler": False,
    "max_epochs": 10,
    "num_sanity_val_steps": 0,
    "logger": lazy_instance(CSVLogger, save_dir=DEFAULT_ROOT, name="fit"),
}
HELP_FLAGS = ("-h", "--help")
HELP_ALL = "--help-all"


class EditingArgumentParser(ClearErrorsMixin, LightningArgumentParser):
    """The LightningCLI parser of ``editing fit|validate|test`` and ``editing backpack distill``."""


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
            from editing.runs.run_folder import RunFolderError

            config = Path(trainer.log_dir) / self.config_filename
            raise RunFolderError(f"{config} exists: that folder holds another run. Resume it with --ckpt_path last, "
                                 "choose another logger version or folder, or pass --budget.overwrite true") from None


class ProjectCLI(SafeCheckpointsMixin, LightningCLI):
    """What the project's LightningCLI commands share: checkpoints loaded safely, ``--trainer.default_root_dir``
    applied (or refused when it contradicts another folder setting), and a short ``--help`` of the main options.

    Args:
        *args: LightningCLI's arguments.
        short_help: print the short help of the command (``args[0]`` is the subcommand) instead of running it.
        **kwargs: LightningCLI's keyword arguments.
    """

    command: str | None = None
    """How the help names the command (``editing <command>``; default: the subcommand)."""
    main_options: dict[str, tuple[str, ...]] = {}
    """Per subcommand, the options the short help explains (dotted keys of the subcommand's parser)."""

    def __init__(self, *args, short_help: bool = False, **kwargs) -> None:
        self._short_help = short_help
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        if self._short_help:
            print(self.short_help(self._subcommand_parsers[args[0]], args[0], list(args[1:])))
            raise SystemExit(0)
        super().parse_arguments(parser, args)

    def add_core_arguments_to_parser(self, parser) -> None:
        super().add_core_arguments_to_parser(parser)
        for action in parser._actions:
            if action.dest == "trainer.default_root_dir":
                action.help = ("root of the run folders: the default logger's folder goes under it (ROOT/<command>/"
                               "version_N); with --trainer.logger false it is the run folder itself. Default: the "
                               "current folder, where the logger writes runs/<command>/version_N")

    def help_parts(self, parser, subcommand: str, args: list[str]) -> tuple[str, object]:
        """The short help's text before the main options, and the parser their help is read from."""
        return "", parser

    def short_help(self, parser, subcommand: str, args: list[str]) -> str:
        """The first screen of ``--help``: the main options with their defaults, and where the rest is."""
        command = self.command or subcommand
        intro, parser = self.help_parts(parser, subcommand, args)
        lines = [f"usage: editing {command} [--config FILE ...] [--KEY VALUE ...]", "", intro.strip(), "",
                 "Main options (code defaults; a --config file may set others, see --print_config):"]
        lines += option_lines(parser, self.main_options.get(subcommand, ()))
        lines += ["", f"Every option (Trainer, checkpoints, logger, ...): editing {command} {HELP_ALL}",
                  f"The settings a command line resolves to: editing {command} --config FILE ... --print_config"]
        return "\n".join(lines)

    def before_instantiate_classes(self) -> None:
        # run=False (``editing backpack cache-teacher``): no subcommand, the settings are the whole config
        config = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand == "fit":
            apply_output_dir(config)
        apply_default_root_dir(config)


FOLDER_LOGGERS = ("CSVLogger", "TensorBoardLogger")
"""Loggers whose folder is ``save_dir/name/version``: ``--budget.output_dir`` puts theirs in the run folder."""


def apply_output_dir(config: Namespace) -> None:
    """``--budget.output_dir D`` names the run folder exactly, so everything the run keeps goes there: the logger's
    files (``metrics.csv``, ``config.yaml``) and the checkpoints (``D/checkpoints``, where ``--ckpt_path last`` looks),
    whatever folder the logger was configured with. Without a logger (``--trainer.logger false``) Lightning's root is
    the run folder, so ``--trainer.default_root_dir`` becomes D. A logger folder or root that named another folder is
    not silently ignored: a note says where the files go (a run's saved ``config.yaml``, given again with another
    ``--budget.output_dir``, names its old folder)."""
    budget = config.get("budget")
    out = budget.get("output_dir") if isinstance(budget, Namespace) else None
    if out is None:
        return
    root = config.trainer.get("default_root_dir")
    if root is not None and Path(root) != Path(out) and _launching_process():
        print(f"note: --budget.output_dir {out} is the run folder: checkpoints and logs go there too, not under "
              f"--trainer.default_root_dir {root}", file=sys.stderr)
    config.trainer.default_root_dir = str(out)
    logger = config.trainer.get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        init_args = entry.get("init_args") if isinstance(entry, Namespace) else None
        if init_args is None or not str(entry.get("class_path", "")).endswith(FOLDER_LOGGERS):
            continue
        before = Path(init_args.get("save_dir") or DEFAULT_ROOT, init_args.get("name") or "",
                      str(init_args.get("version") or ""))
        chosen = init_args.get("save_dir") not in (None, DEFAULT_ROOT, str(root), str(out)) or \
            init_args.get("version") not in (None, "")
        if chosen and before != Path(out) and _launching_process():
            print(f"note: --budget.output_dir {out} is the run folder: the logger writes there, not under {before}",
                  file=sys.stderr)
        init_args.save_dir, init_args.name, init_args.version = str(out), "", ""


def apply_default_root_dir(config: Namespace) -> None:
    """``--trainer.default_root_dir ROOT``: the folder settings still at their default root (``runs``) move under
    ROOT (the CSVLogger's ``save_dir``, ``report.root``); one set to another folder is refused, so that the option is
    never silently ignored. With ``--trainer.logger false`` Lightning itself makes ROOT the run folder."""
    root = config.trainer.get("default_root_dir")
    if root is None:
        return
    logger = config.trainer.get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        init_args = entry.get("init_args") if isinstance(entry, Namespace) else None
        if init_args is None or init_args.get("save_dir") is None:
            continue
        if init_args.save_dir == DEFAULT_ROOT:
            init_args.save_dir = str(root)
        elif Path(init_args.save_dir) != Path(root):
            raise ConfigError(f"--trainer.default_root_dir {root} and the logger's save_dir {init_args.save_dir} "
                              "disagree on where the run folder goes; give only one (e.g. drop the logger's "
                              "save_dir from the config, or pass --trainer.logger.init_args.save_dir instead)")
    report = config.get("report")
    if isinstance(report, Namespace) and report.get("root") is not None:
        if report.root == DEFAULT_ROOT:
            report.root = str(root)
        elif Path(report.root) != Path(root):
            raise ConfigError(f"--trainer.default_root_dir {root} and --report.root {report.root} disagree on where "
                              "the results go; give only one")


class EditingCLI(ProjectCLI):
    """LightningCLI with the project's defaults: any editing method as the model (``--model LoRAEditor``; the
    default is the unedited ``EditingModule``), the degradation budget while fitting, results files after
    validate/test, and no duplicated examples under DDP (our batch sampler shards by rank itself)."""

    main_options = {
        "fit": ("model.base.name", "model.base.precision", "model.optimizer.lr", "model.lora.rank",
                "model.regularization.kind", "model.regularization.weight", "trainer.max_epochs",
                "trainer.accumulate_grad_batches", "budget.balls", "data.task", "data.split", "data.eval_limit",
                "data.general_limit", "budget.output_dir", "trainer.default_root_dir", "ckpt_path", "base_edit"),
        "validate": ("model.base.name", "model.base.precision", "data.task", "data.eval_limit",
                     "data.general_limit", "data.max_tokens", "report.output_dir", "report.overwrite",
                     "trainer.default_root_dir", "trainer.accelerator", "trainer.devices"),
        "test": ("model.base.name", "model.base.precision", "data.task", "data.split", "data.eval_limit",
                 "data.general_limit", "data.max_tokens", "report.output_dir", "report.overwrite",
                 "trainer.default_root_dir", "trainer.accelerator", "trainer.devices"),
    }

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no predict: editing has nothing to generate
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "fit":
            parser.add_argument("--base_edit", type=str | None, default=None,
                                help="an edit folder (<run>/edits/ball_<eps>) to fit on top of: the fit starts from "
                                     "the base model with that edit and saves the cumulative edit, while p0 (the "
                                     "balls, the KL term) stays the original base model; a sequence of edits "
                                     "(editing sequence)")
            parser.add_argument(SMALL_DATA_OPTION, type=bool | None, default=None, help=SMALL_DATA_HELP)
        if subcommand != "fit":
            # an evaluation's results go to report.output_dir; a CSV log of it would be a stray run folder.
            # Lightning's own tables (one per dataloader, metric names cut short) give way to the EvaluationWriter's
            parser.set_defaults({"trainer.logger": False, "verbose": False})
        return parser

    def parse_arguments(self, parser, args) -> None:
        self._given = list(args or [])  # what the command line itself sets (the small-data rule reads it)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        if self.subcommand == "fit":
            apply_small_data(self.config["fit"], getattr(self, "_given", []))

    def add_arguments_to_parser(self, parser) -> None:
        from callbacks.degradation_budget import DegradationBudget
        from callbacks.evaluation_writer import EvaluationWriter

        parser.add_lightning_class_args(EvaluationWriter, "report")
        parser.add_lightning_class_args(DegradationBudget, "budget")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})
        parser.set_defaults({"model": {"class_path": "editing.methods.base.EditingModule"}})

    def help_parts(self, parser, subcommand: str, args: list[str]) -> tuple[str, object]:
        if subcommand != "fit":
            pair = "test" if subcommand == "test" else "validation"
            intro = (f"Evaluate a model on a task's {pair} pair: evaluation.json and evaluation_scores.jsonl in "
                     "--report.output_dir.\n" + COMPOSE.format(first="models/pythia-70m"))
            return intro, model_help_parser(parser, _editing_module())
        method = method_from_args(args)
        if method is None:  # every method's options can be explained (model.lora.rank is a main one)
            merged = model_help_parser(parser, *known_methods().values(), _editing_module())
            return f"{FIT_INTRO}\n\n{methods_overview()}", merged
        merged = model_help_parser(parser, method)
        intro = "\n".join([FIT_INTRO, "", f"--model {method.__name__}: {first_sentence(inspect.getdoc(method) or '')}.",
                           "Its own options:",
                           *option_lines(merged, method_options(method))])
        return intro, merged

    def _attach_config(self) -> None:
        from callbacks.degradation_budget import DegradationBudget
        from callbacks.evaluation_writer import EvaluationWriter

        resolved = json.loads(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False,
                                                                  format="json"))
        for callback in self.trainer.callbacks:
            if isinstance(callback, (EvaluationWriter, DegradationBudget)):
                callback.resolved_config = resolved

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would parse the hyperparameters stored in a --ckpt_path FILE as the model's init arguments,
        # which ours are not (they describe the run), so an explicit path never resumed. The command line defines
        # the run; the file is checked here and against the run before the fit starts (_prepare_run_folders).
        self._check_ckpt_file()

    def before_fit(self) -> None:
        self._attach_config()
        self._apply_base_edit()
        self._prepare_run_folders()
        tidy_progress_bar(self.trainer)

    def _apply_base_edit(self) -> None:
        """``--base_edit DIR``: the fit continues that edit (``editing.methods.base_edit``); before the run folder
        is claimed and a checkpoint checked against it (which compares the base edit the checkpoint was made on)."""
        folder = self.config[self.subcommand].get("base_edit")
        if folder is None:
            return
        from editing.edits.base_edit import read_base_edit

        self.model.set_base_edit(read_base_edit(folder, self.model))

    def _prepare_run_folders(self) -> None:
        """Before the fit touches any file: resolve and check the checkpoint to resume, claim the run folders
        (refusing a fit that would clobber another run, or that cannot write), and keep the metrics log of a run
        being resumed. A fit refused here has changed nothing on disk."""
        from callbacks.degradation_budget import DegradationBudget
        from editing.runs.metrics_log import keep_metrics_log, keep_tensorboard_history

        trainer = self.trainer
        config = self.config_init[self.subcommand]
        path = _resolve_ckpt_path(trainer, config.get("ckpt_path"))
        restarting = config.get("ckpt_path") == "last" and path is None
        checkpoint = _read_checkpoint(path) if path is not None else None
        if checkpoint is not None:
            self.model.check_checkpoint(checkpoint, str(path))
            config["ckpt_path"] = str(path)  # resume the very file that was checked
        elif restarting:
            config["ckpt_path"] = None
        resuming = bool(config.get("ckpt_path"))
        budget = next((cb for cb in trainer.callbacks if isinstance(cb, DegradationBudget)), None)
        if budget is None or not _launching_process():
            return
        budget.claim_run_folder(trainer, resuming, also=(Path(trainer.log_dir),), restarting=restarting)
        if resuming:
            step = _resumed_logging_step(checkpoint or {})
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    keep_metrics_log(logger)
                elif isinstance(logger, TensorBoardLogger):
                    keep_tensorboard_history(logger, step)

    def before_validate(self) -> None:
        self._attach_config()

    def before_test(self) -> None:
        self._attach_config()


def _resumed_logging_step(state: dict) -> int:
    """The first step a run resumed from checkpoint ``state`` logs at: Lightning's count of batches that stepped
    the optimizer (the step of its logged rows), saved in the fit loop's state."""
    loops = (state.get("loops") or {}).get("fit_loop") or {}
    stepped = (loops.get("epoch_loop.state_dict") or {}).get("_batches_that_stepped")
    return int(stepped if stepped is not None else state.get("global_step", 0))


COMPOSE = ("Configs compose (later --config files override earlier ones key by key; options override both):\n"
           "  --config lightning_configs/{first}.yaml --config lightning_configs/tasks/stereoset.yaml")
FIT_INTRO = ("Train a method on a task's canonical examples; after each epoch, keep per degradation ball the last\n"
             "epoch inside it (run folder: results.json, edits/ball_<eps>/).\n" + COMPOSE.format(first="fit/lora"))


def tidy_progress_bar(trainer) -> None:
    """Drop ``v_num`` (the logger's version) from the progress bar, since the run folder is printed at the end and
    a bare number beside the loss reads as a metric; and count the rich bar's epochs from 1, as the per-epoch lines
    and results.json do (Lightning's ``Epoch 0/2`` is the first of three)."""
    bar = trainer.progress_bar_callback
    if bar is None:
        return
    original = bar.get_metrics

    def get_metrics(trainer, pl_module):
        metrics = dict(original(trainer, pl_module))
        metrics.pop("v_num", None)
        return metrics

    bar.get_metrics = get_metrics
    if hasattr(bar, "_get_train_description"):  # RichProgressBar
        def description(current_epoch: int) -> str:
            total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else "?"
            return f"training epoch {current_epoch + 1}/{total}"

        bar._get_train_description = description


def _editing_module() -> type:
    from editing.methods.base import EditingModule

    return EditingModule


def known_methods() -> dict[str, type]:
    """The editing methods ``--model`` accepts by short name: class name -> class, from the method registry."""
    import editing.methods  # noqa: F401 - importing the package registers every method in it
    from editing.methods.registry import METHODS

    return {spec.module.__name__: spec.module for spec in METHODS.values()}


def _config_groups(cls: type) -> dict[str, type]:
    """The parameters of a method's ``__init__`` that take a settings dataclass: name -> dataclass."""
    hints = typing.get_type_hints(cls.__init__)
    groups = {}
    for name in inspect.signature(cls.__init__).parameters:
        options = typing.get_args(hints.get(name)) or (hints.get(name),)
        found = [o for o in options if inspect.isclass(o) and is_dataclass(o)]
        if found:
            groups[name] = found[0]
    return groups


def method_options(cls: type) -> list[str]:
    """The options a method adds to the shared ones (base, optimizer, regularization): its settings groups' fields
    and its plain parameters, as dotted ``model.*`` keys."""
    from dataclasses import fields

    shared = set(inspect.signature(_editing_module().__init__).parameters)
    keys = []
    groups = _config_groups(cls)
    for name in inspect.signature(cls.__init__).parameters:
        if name in shared or name in ("self", "args", "kwargs"):
            continue
        if name in groups:
            keys += [f"model.{name}.{f.name}" for f in fields(groups[name])]
        else:
            keys.append(f"model.{name}")
    return keys


def model_help_parser(parser, *classes: type):
    """A parser holding ``parser``'s options plus the ``model.*`` options of the methods ``classes`` (LightningCLI
    keeps a subclass-mode model as one option, so its settings have no options of their own to read help from)."""
    from editing.commands.parsing import ArgumentParser

    models = []
    for cls in classes:
        model = ArgumentParser()
        groups = _config_groups(cls)
        for name, dataclass in groups.items():
            model.add_class_arguments(dataclass, f"model.{name}")
        model.add_class_arguments(cls, "model", skip=set(groups))
        models.append(model)
    return _Merged(parser, *models)


class _Merged:
    """Options looked up in several parsers, the first that has one winning."""

    def __init__(self, *parsers) -> None:
        self._actions = [a for p in reversed(parsers) for a in p._actions]


def first_sentence(text: str) -> str:
    """The first sentence of a help text, on one line, without reST markup (``e.g.`` does not end it)."""
    text = re.sub(r"\s+", " ", text).replace("``", "").strip()
    end = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return text[:end.start()] if end else text


def option_lines(parser, keys, width: int = 118) -> list[str]:
    """Per option, ``--key default`` and the first sentence of its help, on one line."""
    actions = {a.dest: a for a in parser._actions}
    lines = []
    for key in keys:
        action = actions.get(key)
        if action is None:
            continue
        default = action.default
        if isinstance(default, Namespace) or default == "==SUPPRESS==":
            default = None
        shown = "" if default is None else f" {default if isinstance(default, str) else json.dumps(default)}"
        text = first_sentence(action.help or "")
        flag = f"  --{key}{shown}"
        column = 40 if len(flag) < 40 else len(flag) + 2
        lines.append(_one_line(f"{flag:<{column}}{text}".rstrip(), width))
    return lines


def _one_line(line: str, width: int = 118) -> str:
    """``line`` cut at a word boundary to ``width`` characters, ending in `` ...`` when cut."""
    if len(line) <= width:
        return line
    return line[:width - 4].rsplit(" ", 1)[0] + " ..."


def methods_overview() -> str:
    """``--model`` and, per method, its own options and the first sentence of its docstring."""
    lines = ["Method: --model NAME (default EditingModule: no edit); its options: editing fit --model NAME --help"]
    for name, cls in known_methods().items():
        keys = method_options(cls)
        groups = sorted({k.rsplit(".", 1)[0] for k in keys})
        options = ", ".join(f"--{g}.*" if g != "model" else ", ".join(f"--{k}" for k in keys if k.count(".") == 1)
                            for g in groups)
        lines.append(_one_line(f"  {name:<14} {options:<30} {first_sentence(inspect.getdoc(cls) or '')}"))
    return "\n".join(lines)


def method_from_args(args: list[str]) -> type | None:
    """The method class a command line names: its last ``--model NAME``, else the ``model.class_path`` of its
    last ``--config`` file that has one; None when neither (or a name that is not a method)."""
    from editing.core.textfiles import load_yaml

    names = _option_values(args, "--model")
    if not names:
        for path in _option_values(args, "--config"):
            if Path(path).is_file():
                model = (load_yaml(path, "config file") or {}).get("model")
                if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                    names.append(model["class_path"])
    if not names:
        return None
    name = names[-1]
    check_model_class(name)
    known = known_methods()
    if name in known:
        return known[name]
    short = name.rsplit(".", 1)[-1]
    return known.get(short) or _import(name)


def _import(dotted: str):
    import importlib

    module_name, _, class_name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


def _launching_process() -> bool:
    """Whether this is the process that starts the fit (global rank 0). Before the fit the trainer's ranks are not
    set yet (every DDP process reads as rank 0), so they are read from the environment the launcher sets."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0 and int(os.environ.get("NODE_RANK") or 0) == 0


def _resolve_ckpt_path(trainer, ckpt_path: str | None) -> Path | None:
    """The checkpoint file ``--ckpt_path`` means: ``last`` is the newest ``last*.ckpt`` or ``interrupted.ckpt``
    (``SaveOnInterrupt``'s) where the run's ModelCheckpoint writes (None when there is none: the fit starts afresh,
    as Lightning does); other keywords (``best``, ``hpc``) are left to Lightning (None)."""
    if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    if ckpt_path == "last":
        folders = {Path(cb.dirpath) if cb.dirpath else Path(trainer.log_dir) / "checkpoints"
                   for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)}
        found = [f for folder in folders for pattern in ("last*.ckpt", SaveOnInterrupt.FILENAME)
                 for f in folder.glob(pattern) if f.is_file()]
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
    from editing.runs.checkpoints import CKPT_PATH_FIX, load_checkpoint_file

    return load_checkpoint_file(path, fix=CKPT_PATH_FIX)


def wants_help(args: list[str]) -> str | None:
    """``short`` for ``-h``/``--help``, ``all`` for ``--help-all``, None otherwise."""
    return "all" if HELP_ALL in args else "short" if any(a in HELP_FLAGS for a in args) else None


@contextmanager
def field_docstrings(args: list[str]) -> Iterator[None]:
    """While a help is printed, read the help of settings dataclasses' fields from their attribute docstrings
    (slower, so only then; any ``--help``, ``--help-all`` or ``--KEY.help``)."""
    if wants_help(args) is None and not any(a.endswith(".help") for a in args):
        yield
        return
    from jsonargparse import set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)


def run_lightning_cli(subcommand: str, args: list[str]) -> None:
    """``editing fit|validate|test`` through LightningCLI."""
    from editing.data.datamodule import TaskDataModule
    from editing.methods.base import EditingModule

    if subcommand in ("fit", "validate", "test"):
        for value in _option_values(args, "--model"):
            check_model_class(value)
    help_kind = wants_help(args)
    stop = StopOnSignal([subcommand, *args])
    if subcommand == "fit":
        interruption.keep("nothing yet (training had not started)", stop.resume_args())
    try:
        with field_docstrings(args):
            EditingCLI(
                EditingModule,
                TaskDataModule,
                subclass_mode_model=True,
                args=[subcommand, *["--help" if a == HELP_ALL else a for a in args]],
                trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [stop]},
                save_config_callback=FitConfigSaver,
                parser_class=EditingArgumentParser,
                parser_kwargs={"prog": "editing"},
                short_help=help_kind == "short",
            )
    except SystemExit:
        # Lightning ends a fit stopped by StopOnSignal with its SIGTERMException (exit 0), and one interrupted at once
        # (a second Ctrl-C, or one before training) with exit 1; the callback recorded what was kept
        if stop.interrupted_by is not None:
            raise interruption.Interrupted(stop.interrupted_by) from None
        raise


@parses_own_arguments
def fit(args: list[str]) -> None:
    """``editing fit``: train an edit, evaluated after every epoch inside the degradation balls."""
    run_lightning_cli("fit", args)


@parses_own_arguments
def validate(args: list[str]) -> None:
    """``editing validate``: evaluate a model on a task's validation pair."""
    run_lightning_cli("validate", args)


@parses_own_arguments
def test(args: list[str]) -> None:
    """``editing test``: evaluate a model on a task's test pair."""
    run_lightning_cli("test", args)


class SaveOnInterrupt(Callback):
    """Writes ``interrupted.ckpt`` beside the run's other checkpoints when a fit stops on an exception (Ctrl-C, a
    crash) after at least one optimizer step; ``--ckpt_path last`` takes the newer of it and ``last.ckpt``.

    Not Lightning's ``OnExceptionCheckpoint``: given one, a fit without ``--ckpt_path`` resumes from whatever
    checkpoint that callback would have written (Lightning's implicit ``last``), and before the fit starts that is
    ``./interrupted.ckpt`` in the working folder. A run that failed in its setup left one there at step 0 and the
    next distillation from that folder, of any config, silently resumed from it. Here a fit without ``--ckpt_path``
    always starts afresh, and a failure before the first step writes nothing (nothing was trained).
    """

    FILENAME = "interrupted.ckpt"

    def __init__(self) -> None:
        self.dirpath: Path | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        checkpoint = _last_checkpoint(trainer)
        self.dirpath = Path(checkpoint.dirpath) if checkpoint is not None else Path(trainer.default_root_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.dirpath is None or trainer.global_step == 0:
            return
        _save_training_state(trainer, str(self.dirpath / self.FILENAME))


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
        _save_last(trainer, checkpoint)


def _save_last(trainer, checkpoint) -> None:
    """Bring ``last.ckpt`` up to this step: the whole training state (optimizer, loops), as the periodic saves do."""
    path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
    _save_training_state(trainer, path)
    checkpoint._last_global_step_saved = trainer.global_step
    checkpoint.last_model_path = path


def _save_training_state(trainer, path: str) -> None:
    """Write a checkpoint of the whole training state (weights, optimizer, loops) to ``path``: what a resume needs.
    A write only; checkpoints are read back with ``weights_only=True`` (``editing.runs.checkpoints``)."""
    trainer.save_checkpoint(path, weights_only=False)  # said, so that Lightning prints no info line about it


class StopOnSignal(Checkpoint):
    """Ctrl-C or SIGTERM while a fit trains: finish the optimizer step (or the epoch's evaluation), bring
    ``last.ckpt`` up to date, and stop, so that ``--ckpt_path last`` resumes exactly there; a second signal stops at
    once. What the run keeps and the command that resumes it are recorded as it goes
    (``editing.core.interruption``), for
    the line ``editing.cli.main`` prints.

    It saves only where Lightning's own periodic checkpoints are taken: at the end of a batch that made an optimizer
    step (between the micro-batches of a gradient accumulation the summed gradients are in no checkpoint), and at an
    epoch's end, after the DegradationBudget has evaluated it. Being a ``Checkpoint``, it runs after the other
    callbacks and after the ModelCheckpoint. The stop itself is Lightning's SIGTERM stop, which comes once the step's
    (or the epoch's) metrics are logged, so the metrics log holds every row up to the checkpoint. Under DDP the
    ranks agree on the step to stop at. A batch or epoch that ends the training is not stopped at: the results are
    written a moment later.

    Args:
        command: the command line after ``editing`` (``fit ...``), for the resume command.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, command: Sequence[str] = ()) -> None:
        self.command = list(command)
        self.requested: int | None = None
        self.interrupted_by: int | None = None
        self._previous: dict[int, object] = {}
        self._step_seen: int | None = None
        self._run_dir: Path | None = None
        self._pinned = bool(_option_values(self.command, "--budget.output_dir"))

    # what is kept, and how to resume ----------------------------------------------------------------------------
    def resume_args(self) -> list[str]:
        """The command line that resumes the run: the same one with ``--ckpt_path last`` (and the run folder
        pinned, when the logger chose it)."""
        args = _without_option(self.command, "--ckpt_path")
        if self._run_dir is not None and not self._pinned:
            args += ["--budget.output_dir", str(self._run_dir)]
        return [*args, "--ckpt_path", "last"]

    def _keep(self, trainer) -> None:
        budget = _budget(trainer)
        epochs = len(budget.history) - 1 if budget is not None and budget.history else None
        evaluated = "" if epochs is None else " and epoch 0 (p0)" if epochs == 0 else f" and epochs 0..{epochs}"
        path = _newest_last(trainer)
        if path is None:
            saved = "no checkpoint yet" if _last_checkpoint(trainer) is not None else \
                "no checkpoint (--checkpoint.save_last is false)"
            what = f"{saved}{evaluated}; its folder {self._run_dir} is resumed from the start"
        else:
            what = f"the checkpoint {path} (step {trainer.global_step}){evaluated} in {self._run_dir}"
        interruption.keep(what, self.resume_args())

    # hooks ------------------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        budget = _budget(trainer)
        if budget is not None and budget.output_dir is not None:
            self._pinned = True  # given in a --config file
        self._run_dir = budget.run_dir(trainer) if budget is not None else Path(trainer.log_dir or ".")
        self._keep(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step_seen = trainer.global_step
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._request)

    def _restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _request(self, signum: int, frame) -> None:
        if self.requested is not None:
            raise interruption.Interrupted(signum)  # the second signal: at once
        self.requested = signum
        print(f"{interruption.SIGNAL_NAMES.get(signum, signum)}: stopping after this training step (or this epoch's "
              "evaluation) to save a checkpoint; press Ctrl-C again to stop at once", file=sys.stderr, flush=True)

    def _stop_here(self, trainer) -> None:
        requested = self.requested is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        checkpoint = _last_checkpoint(trainer)
        if checkpoint is not None and checkpoint._last_global_step_saved != trainer.global_step:
            _save_last(trainer, checkpoint)
        self._keep(trainer)
        self.interrupted_by = self.requested or signal.SIGTERM
        trainer._signal_connector.received_sigterm = True  # Lightning stops once this step's rows are logged

    def _last_epoch(self, trainer) -> bool:
        return trainer.should_stop or (trainer.max_epochs is not None
                                       and 0 <= trainer.max_epochs <= trainer.current_epoch + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self._step_seen = trainer.global_step != self._step_seen, trainer.global_step
        batches = trainer.num_training_batches
        if self._last_epoch(trainer) and isinstance(batches, int) and batch_idx + 1 >= batches:
            return  # the training ends with this batch
        if stepped:
            self._stop_here(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self._last_epoch(trainer):
            self._stop_here(trainer)
        if self.interrupted_by is None:
            self._keep(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        for logger in trainer.loggers:
            logger.save()  # the log up to the stop: a resumed run replaces only the rows after its checkpoint
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted_by = interruption.signal_of(exception)
            self._keep(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


def _budget(trainer):
    from callbacks.degradation_budget import DegradationBudget

    return next((cb for cb in trainer.callbacks if isinstance(cb, DegradationBudget)), None)


def _newest_last(trainer) -> Path | None:
    """The newest ``last*.ckpt`` of the run (what ``--ckpt_path last`` resumes), None when there is none."""
    checkpoint = _last_checkpoint(trainer)
    if checkpoint is None:
        return None
    found = [f for f in Path(checkpoint.dirpath).glob("last*.ckpt") if f.is_file()]
    return max(found, key=lambda f: f.stat().st_mtime) if found else None


def _without_option(args: Sequence[str], option: str) -> list[str]:
    """``args`` without ``option`` and its value (``--option VALUE`` or ``--option=VALUE``)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
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


def check_model_class(value: str) -> None:
    """An unknown ``--model`` class gets the list of methods (jsonargparse says only "expected a dot import path")."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*", value) or value.endswith((".yaml", ".yml", ".json")):
        return  # a config file or an inline YAML/JSON value: jsonargparse checks those itself
    from editing import methods
    base = _editing_module()
    known = sorted(known_methods())
    aliases = [n for n in methods.__all__ if inspect.isclass(getattr(methods, n))
               and issubclass(getattr(methods, n), base)]  # old names (FullFinetune, ...) and EditingModule
    if value in known or value in aliases:
        return
    if "." in value:
        cls = _import(value)
        if inspect.isclass(cls) and issubclass(cls, base):
            return
    raise ConfigError(f"--model {value!r} is not an editing method; use one of {', '.join(known)} "
                      "(e.g. --model LoRAEditor) or the dotted import path of an EditingModule subclass")

"""The Python API: ``from editing import edit``.

``edit`` makes one ``editing fit`` run: it writes the fit's settings as the command's options (the method's shipped
config ``lightning_configs/fit/<method>.yaml``, the task, the balls and any dotted override) and runs them through
the same LightningCLI as the command, so the LightningModule, the DataModule, the DegradationBudget callback and the
Evaluator are the very objects ``editing fit`` builds; a run made here is a run folder like any other (``results.json``,
``edits/ball_<eps>/``), and ``editing fit`` with the same options gives the same numbers and weights
(``tests/commands/test_api.py``). The edited model handed back is the saved edit of the chosen ball, loaded the way
``editing apply`` loads it (``editing.edits.load.load_edited``).

A model the caller already holds (``edit(model=model, tokenizer=tokenizer)``, a ``(model, tokenizer)`` pair, or a
peft model) is run the same way, in this process: a copy of it is held under a ``memory:<digest>`` name
(``editing.models.memory``) that the fit's ``load_model`` copies from, so no weights are read from disk, and a second
edit of the same model reuses the copy and the p0 cache. ``inplace=True`` writes the edit into the caller's model
(``editing.edits.inplace``).

Examples given as Python dicts (or a JSONL file) become a task YAML inside the run folder (``task/``), so the run
can be repeated from the command line: ``editing fit --config <run>/config.yaml --budget.output_dir
<another folder>``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editing.core.errors import ConfigError, user_error
from editing.core.types import LossType, MethodName

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from editing.edits.combine import CombinedRecord, EditPart
    from editing.edits.load import EditedModule
    from editing.models.generation import Sampling
    from editing.models.loading import LoadedModel
    from editing.runs.records import BallRecord, RunRecord

Examples = Sequence[Mapping[str, str]] | str | Path
"""Examples: a list of ``{"prefix": ..., "suffix": ...}`` dicts (``suffix1``/``suffix2`` for the pair losses,
``text`` for text lines), a JSONL file of them, or, for ``edit(examples=...)``, a task YAML or a built-in task's
name."""

DEFAULT_ROOT = Path("runs") / "edit"
"""Where ``edit`` makes its run folder when no ``output_dir`` is given (``runs/edit/version_N``)."""

# The success threshold of examples given without one: the threshold of the first built-in task of that loss type
# (SPEC section 2), e.g. good: an example succeeds when p(suffix | prefix) >= 0.2.
DEFAULT_THRESHOLDS: dict[LossType, float] = {
    LossType.GOOD: -math.log(0.2), LossType.BAD: math.log(0.001), LossType.BALANCE: math.log(1.5),
    LossType.GOOD_V_BAD: math.log(1 / 16),
}


@dataclass
class EditResult:
    """What ``edit`` returns: the run's typed results, and the edited model of one ball.

    Attributes:
        run: the run's ``results.json`` (``editing.runs.records.RunRecord``): every evaluated epoch and, per ball, the
            chosen epoch with its metrics.
        run_dir: the run folder.
        ball: the key of the ball whose edit ``module`` holds (e.g. ``1e-04``).
        module: that edit applied to a fresh copy of the base model (``editing.edits.load.EditedModule``); its
            ``reference()`` gives the base model back.
    """

    run: RunRecord
    run_dir: Path
    ball: str
    module: EditedModule
    base: LoadedModel | None = None
    """The held base model of an edit of a loaded model (``edit(model=<model>)``), kept while the result lives."""
    caller: Any = None
    """The caller's own model, when ``edit(..., inplace=True)`` wrote the edit into it."""

    @property
    def model(self):
        """The edited model: a transformers model (a peft ``PeftModel`` for LoRA), usable with ``generate``; after
        ``edit(..., inplace=True)``, the caller's own model, which now carries the edit."""
        return self.module.model if self.caller is None else self.caller

    @property
    def tokenizer(self):
        """The base model's tokenizer."""
        return self.module.loaded.tokenizer

    @property
    def balls(self) -> dict[str, BallRecord]:
        """Per ball key: the chosen epoch, its metrics and the success change in percentage points."""
        return self.run.balls

    @property
    def result(self) -> BallRecord:
        """The chosen ball's outcome."""
        return self.run.balls[self.ball]

    def edit_folder(self, ball: float | str | None = None) -> Path:
        """The saved edit of ``ball`` (default: this result's ball) in the run folder."""
        key = self.ball if ball is None else _ball_key(ball, "ball")
        if key not in self.run.edits:
            raise ConfigError(f"ball={ball!r}: the run saved edits for {', '.join(self.run.edits) or 'no ball'}")
        folder = Path(self.run.edits[key])
        return folder if folder.is_absolute() else self.run_dir / "edits" / folder.name

    def for_ball(self, ball: float | str) -> EditResult:
        """The same run's edit of another of its balls (loaded afresh)."""
        key = _ball_key(ball, "ball")
        return EditResult(self.run, self.run_dir, key, _load(self.edit_folder(key), self.run.hyperparameters),
                          base=self.base)

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Copy the edit (its tensors, manifest and base identity) into ``folder``, which ``editing apply --edit``,
        ``editing generate --edit`` and ``load_edited`` read.

        Args:
            folder: the destination folder (must not exist unless ``overwrite``).
            overwrite: replace an existing folder.

        Returns:
            The folder.
        """
        from editing.core.files import save_atomically

        source = self.edit_folder()

        def copy(tmp: Path) -> None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)

        return save_atomically(folder, copy, folder=True, overwrite=overwrite, flag="save(..., overwrite=True)")

    def export(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the edit merged into its base model as a plain transformers folder (safetensors in fp32, config,
        tokenizer, generation config), which ``AutoModelForCausalLM.from_pretrained(folder)`` loads without this
        package: ``editing export --edit <this edit> --merged <folder>``.

        Args:
            folder: the model folder to write (must not exist unless ``overwrite``).
            overwrite: replace an existing folder.

        Returns:
            The folder.

        Raises:
            ConfigError: the method's edit is not a weight change (a sense edit, a codebook), with the reason.
        """
        from editing.edits.export import export_merged

        return export_merged(self.edit_folder(), folder, overwrite=overwrite)

    def generate(self, prompt: str, max_new_tokens: int = 20, sampling: Sampling | None = None,
                 base: bool = False) -> str:
        """The continuation of ``prompt`` by the edited model (greedy unless ``sampling`` says otherwise), asked
        through the chat template when the edit was fitted with one (``edit(..., chat_template=...)``).

        Args:
            prompt: the text to continue.
            max_new_tokens: the most tokens to add.
            sampling: ``editing.models.generation.Sampling`` settings (default: greedy).
            base: continue with the base model instead (the edit taken off).

        Returns:
            The new text alone.
        """
        from editing.data.chat import load_chat_template
        from editing.models.generation import GREEDY, continue_module

        chat = load_chat_template(self.tokenizer, self.run.chat_template)
        return continue_module(self.module, prompt, max_new_tokens, sampling or GREEDY, base, chat=chat)


def edit(model: str | Any = "smollm2-135m", examples: Examples | None = None, *, method: MethodName | str = "lora",
         ball: float = 1e-4, balls: Sequence[float] | None = None, evaluation: Examples | None = None,
         hard_negatives: Examples | None = None, targeted: Examples | None = None,
         loss: LossType | str | None = None, threshold: float | None = None, name: str = "my_edit",
         epochs: int | None = None, settings: Mapping[str, Any] | None = None, output_dir: str | Path | None = None,
         data_root: str | Path | None = None, seed: int = 0, overwrite: bool = False,
         tokenizer: Any = None, inplace: bool = False, base_edit: str | Path | None = None,
         chat_template: bool | str = False) -> EditResult:
    """Edit ``model`` on canonical ``examples`` with ``method``, inside the degradation ball ``ball``.

    Long because its docstring documents every argument of the public API; the body is a dozen lines of calls.

    Args:
        model: the base model: ``smollm2-135m`` (embedded), a tiny test model (``tiny-gpt2``, ``tiny-llama``), a
            model folder, a ``.gguf`` file or a hub id; or a loaded transformers or peft model (with ``tokenizer``,
            or as a ``(model, tokenizer)`` pair), edited here from a held copy (``editing.models.memory``).
        examples: the canonical examples: a list of dicts (``{"prefix": ..., "suffix": ...}``; ``suffix1`` and
            ``suffix2`` for the ``balance`` and ``good-v-bad`` losses), a JSONL file of them, a task YAML, or a
            built-in task's name (``country_capital``).
        method: ``lora``, ``full``, ``memit``, ``senses`` (a Backpack model) or a registered method of one's own.
        ball: the degradation ball (eps) whose edit the result holds: the last epoch whose general NLL stayed
            within (1 + eps) of the base model's.
        balls: every ball to track (default: ``ball`` alone); ``ball`` must be one of them.
        evaluation: the examples success is measured on (same forms as ``examples``; default: the canonical
            examples themselves). Only with examples given as a list or a JSONL file (a task YAML names its own).
        hard_negatives: prompts whose continuation must not change (prefix/suffix dicts or ``text`` lines).
        targeted: texts for the targeted degradation (``text`` lines), optional.
        loss: ``good`` (make the suffix likely; the default), ``bad``, ``balance`` or ``good-v-bad``.
        threshold: an evaluation example succeeds when its score is at most this (default: the threshold of the
            built-in tasks of the same loss, e.g. good: -ln 0.2, i.e. p(suffix) >= 0.2).
        name: the task's name in the results (examples given as a list or JSONL).
        epochs: training epochs (default: the method's shipped config; for examples of one's own, the small-data
            rule of ``editing auto``, which also sets the accumulation: ``editing.commands.practitioner``). A task
            of one's own also measures the degradation on a growing sample of G with its interval
            (``settings={"budget.general_sample": "all"}`` for every text; README, "Defaults for a handful of
            examples").
        settings: more ``editing fit`` options as dotted keys, e.g. ``{"model.init_args.optimizer.lr": 1e-3,
            "trainer.accumulate_grad_batches": 1}``.
        output_dir: the run folder (default: ``runs/edit/version_N`` in the current folder).
        data_root: the folder of the task data (built-in tasks, and the general text the degradation is measured
            on); default: searched as by the commands.
        seed: the seed of training and data order.
        overwrite: replace a finished run in ``output_dir``.
        tokenizer: the tokenizer of a loaded ``model``.
        inplace: write the chosen ball's edit into the caller's loaded model (merged into its weights; a weight
            change only, not a peft model); by default the caller's model is left untouched.
        base_edit: an edit folder of the same base model to fit on top of (``editing fit --base_edit``): the
            result is the cumulative edit, with the balls still around the original model's general NLL.
        chat_template: ask the examples through a chat template (``editing fit --data.chat_template``): True for
            the tokenizer's own (a chat model such as SmolLM2-Instruct), or a Jinja template (text or file); the
            prefix is the user's turn and the suffix the start of the reply; ``result.generate`` asks the same way.

    Returns:
        An ``EditResult``: the typed per-ball results (``.balls``), the edited model (``.model``), ``.save(folder)``,
        ``.export(folder)`` (a merged transformers model) and ``.generate(prompt)``.

    Raises:
        ConfigError: an argument or setting that does not fit (the message names it and how to fix it: the error
            ``editing fit`` prints for the same setting).
        DataFormatError: a JSONL file of examples with a malformed line (the message names the file and line).
        ModelNotAvailableError: a model that cannot be loaded here (a hub id without network).
    """
    loaded, tokenizer = _loaded_model(model, tokenizer, inplace)
    method, keys = _checked_arguments("memory:" if loaded is not None else model, method, ball, balls, epochs,
                                      settings)
    held = None if loaded is None else _hold(loaded, tokenizer, method, inplace)
    out = _unfinished_folder(output_dir, overwrite)
    task = _task(out, examples, evaluation, hard_negatives, targeted, loss, threshold, name)
    if base_edit is not None:
        settings = {**(settings or {}), "base_edit": str(base_edit)}
    if chat_template is not False:
        if not isinstance(chat_template, (bool, str)):
            raise ConfigError(f"edit(chat_template={chat_template!r}): give True (the tokenizer's template), False, "
                              "or a Jinja chat template (its text or a file)")
        settings = {**(settings or {}), "data.chat_template": chat_template}
    _fit(fit_args(method, model if held is None else held.identity["name"], task, keys, out, epochs=epochs,
                  settings=settings, data_root=data_root, seed=seed, overwrite=overwrite))
    return _held_result(load_result(out, keys[0]), held, loaded if inplace else None)


def _held_result(result: EditResult, held: LoadedModel | None, caller: Any) -> EditResult:
    """The result of an edit of a loaded model: it keeps the held base alive, and with ``inplace`` the edit is
    written into the caller's model (``editing.edits.inplace``)."""
    result.base = held
    if caller is not None:
        from editing.edits.inplace import write_into

        result.caller = write_into(caller, result.edit_folder())
    return result


def _loaded_model(model: Any, tokenizer: Any, inplace: Any) -> tuple[Any, Any]:
    """A loaded model given as ``model`` (alone with ``tokenizer``, or as a ``(model, tokenizer)`` pair) and its
    tokenizer, or (None, None) for a model given by name; checked before anything is copied or written."""
    from editing.models.memory import is_loaded_model

    if not isinstance(inplace, bool):
        raise ConfigError(f"edit(inplace={inplace!r}): give True or False")
    if isinstance(model, tuple):
        if len(model) != 2 or not is_loaded_model(model[0]):
            raise ConfigError("edit(model=(...)): give a (model, tokenizer) pair, e.g. edit(model=(model, tokenizer), "
                              "...), or edit(model=model, tokenizer=tokenizer, ...)")
        if tokenizer is not None:
            raise ConfigError("edit(model=(model, tokenizer), tokenizer=...): give the tokenizer once, in the pair or "
                              "as tokenizer=")
        model, tokenizer = model
    if not is_loaded_model(model):
        if tokenizer is not None:
            raise ConfigError("edit(tokenizer=...) goes with a loaded model (edit(model=model, tokenizer=tokenizer)); "
                              "for a model given by name, set another tokenizer with settings="
                              "{'model.init_args.base.tokenizer': NAME_OR_FOLDER}")
        if inplace:
            raise ConfigError(f"edit(inplace=True) writes the edit into a loaded model, and model={model!r} is a name; "
                              "pass the loaded model (edit(model=model, tokenizer=tokenizer, inplace=True)), or use "
                              "result.model")
        return None, None
    if tokenizer is None:
        raise ConfigError(f"edit(model={type(model).__name__}): pass its tokenizer too: edit(model=model, "
                          "tokenizer=tokenizer, ...) or edit(model=(model, tokenizer), ...)")
    if isinstance(tokenizer, (str, os.PathLike)) or not callable(getattr(tokenizer, "encode", None)):
        raise ConfigError(f"edit(tokenizer={tokenizer!r}): give the loaded tokenizer of the model (e.g. "
                          "AutoTokenizer.from_pretrained(path)), not a name")
    return model, tokenizer


def _hold(model: Any, tokenizer: Any, method: MethodName, inplace: bool) -> LoadedModel:
    """The held copy of a loaded model (``editing.models.memory``), after checking that ``inplace`` can be done."""
    from editing.models.memory import hold_model, is_peft_model

    if inplace:
        import editing.methods  # noqa: F401 - registers the built-in methods
        from editing.methods.registry import method_spec

        if is_peft_model(model):
            raise ConfigError("edit(inplace=True): a peft model is edited on top of its adapters merged, which its own "
                              "weights cannot hold beside the adapters; merge them first (model = "
                              "model.merge_and_unload()) and edit that in place, or leave inplace=False and use "
                              "result.model")
        if method_spec(method).merge_edit is None:
            raise ConfigError(f"edit(inplace=True): method {method.value!r} makes an edit that is not a change of the "
                              "weights (it is applied at run time), so the model's own weights cannot carry it; "
                              "leave inplace=False and use result.model")
    return hold_model(model, tokenizer, where=f"edit(model={type(model).__name__})")


def _checked_arguments(model: str, method: MethodName | str, ball: float, balls: Sequence[float] | None,
                       epochs: int | None, settings: Mapping[str, Any] | None) -> tuple[MethodName, list[str]]:
    """``edit``'s arguments checked before anything is written: the method and the ball keys."""
    if not isinstance(model, str) or not model:
        raise ConfigError(f"edit(model={model!r}): give a model name (e.g. 'smollm2-135m'), folder or hub id")
    if _names_a_path(model) and not Path(model).expanduser().exists():
        raise ConfigError(f"edit(model={model!r}): no such model folder or file; give a folder written by "
                          "save_pretrained, a .gguf file, a hub id or a built-in name (e.g. 'smollm2-135m')")
    method = _typed(MethodName, method, "method")
    keys = _balls(ball, balls)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"edit(epochs={epochs!r}): give a number of epochs >= 1 (or None for the method's default)")
    if settings is not None and not isinstance(settings, Mapping):
        raise ConfigError(f"edit(settings={settings!r}): give a dict of dotted `editing fit` keys to values, e.g. "
                          "{'model.init_args.optimizer.lr': 0.001}")
    return method, keys


def _unfinished_folder(output_dir: str | Path | None, overwrite: bool) -> Path:
    """The run folder, refused when it holds a finished run (without ``overwrite``) before the task files are
    written into it, so a finished run there keeps its own."""
    from editing.runs.run_folder import check_folder

    out = _run_folder(output_dir)
    check_folder(out, resuming=False, overwrite=overwrite, flag="edit(..., overwrite=True)")
    return out


def _fit(args: list[str]) -> None:
    """``editing fit <args>`` in this process; a refused setting ends in the ConfigError ``editing fit`` prints."""
    from editing.commands.lightning import run_lightning_cli

    try:
        run_lightning_cli("fit", args)
    except SystemExit as stop:
        if stop.code in (0, None):
            raise
        # the command's parser has printed which option it refused and why
        raise ConfigError(f"edit(...): `editing fit` refused the settings (see its message above); it was given: "
                          f"{' '.join(args)}") from None
    except Exception as err:
        # jsonargparse wraps a setting's ConfigError (e.g. a negative learning rate) in a ValueError listing union
        # subtypes; the user gets the error `editing fit` prints
        cause = user_error(err)
        if cause is None:
            raise
        raise cause from None


@dataclass
class CombinedResult:
    """What ``combine`` returns: several edits applied to one base model, and how they did together.

    Attributes:
        module: the combined edits on a fresh copy of the base model (``reference()`` takes them all off).
        parts: the edits, as read and verified.
        record: each edit's task measured on the base model, the combined model and the edit alone, and the joint
            degradation (None when ``combine`` was asked not to evaluate).
    """

    module: EditedModule
    parts: list[EditPart]
    record: CombinedRecord | None

    @property
    def model(self):
        """The model carrying every edit (a peft model when LoRA adapters are among them)."""
        return self.module.model

    def generate(self, prompt: str, max_new_tokens: int = 20, sampling: Sampling | None = None,
                 base: bool = False) -> str:
        """The continuation of ``prompt`` by the combined model (``base``: by the base model)."""
        from editing.models.generation import GREEDY, continue_module

        return continue_module(self.module, prompt, max_new_tokens, sampling or GREEDY, base)


def combine(edits: Sequence[EditResult | str | Path], tasks: Sequence[str] | None = None, *, evaluate: bool = True,
            split: str = "val", data_root: str | Path | None = None, eval_limit: int | None = None,
            general_limit: int | None = None, alone: bool = True) -> CombinedResult:
    """Apply several edits to one base model, by the rule of ``editing.edits.combine`` (the README's "Combining edits":
    edits of one method add, two methods changing one tensor are refused), as ``editing apply --edit A --edit B``.

    Args:
        edits: ``EditResult`` objects of ``edit`` or saved edit folders.
        tasks: per edit, the task (name or YAML) to measure it on (default: the task each edit was fitted on).
        evaluate: measure the combination (each task, and the joint degradation).
        split: ``val`` or ``test``.
        data_root: the folder of the task data (default: searched).
        eval_limit: first N examples of the task sets.
        general_limit: first N texts of the general set.
        alone: also measure each edit by itself on its task.

    Returns:
        A ``CombinedResult``: ``.model``, ``.record``, ``.generate(prompt)``.

    Raises:
        ConfigError: an edit that is neither an ``EditResult`` nor a folder, or a combination the rule refuses (two
            folders holding the same edit among them).
    """
    from editing.edits.combine import combine_edits, edit_task, evaluate_combined

    if isinstance(edits, (str, Path, EditResult)) or not isinstance(edits, Sequence) or not edits:
        raise ConfigError("combine(edits=...): give a list of edits (EditResult objects or edit folders)")
    for i, e in enumerate(edits):
        if not isinstance(e, (EditResult, str, os.PathLike)):
            raise ConfigError(f"combine(edits[{i}]={e!r}): give an EditResult of edit() or an edit folder (a str or "
                              "Path such as <run>/edits/ball_<eps>)")
    folders = [e.edit_folder() if isinstance(e, EditResult) else Path(e) for e in edits]
    module, parts = combine_edits(folders)
    if not evaluate:
        return CombinedResult(module, parts, None)
    if tasks is None:
        tasks = [edit_task(folder) for folder in folders]
    elif isinstance(tasks, str) or len(tasks) != len(folders):
        raise ConfigError(f"combine(tasks={tasks!r}): give one task per edit ({len(folders)}), in order")
    record = evaluate_combined(module, parts, list(tasks), split, None if data_root is None else str(data_root),
                               eval_limit, general_limit, alone=alone)
    return CombinedResult(module, parts, record)


def fit_args(method: MethodName, model: str, task: str, balls: Sequence[str], output_dir: Path, *,
             epochs: int | None = None, settings: Mapping[str, Any] | None = None,
             data_root: str | Path | None = None, seed: int = 0, overwrite: bool = False) -> list[str]:
    """The ``editing fit`` command line (without ``fit``) that ``edit`` runs."""
    from editing.core.paths import FIT_DIR
    from editing.methods.registry import get_method
    from editing.protocol.trials import overrides
    from editing.rules.budget import key_eps

    shipped = FIT_DIR / f"{method.value}.yaml"
    cls = get_method(method)
    if shipped.is_file():
        args = ["--config", str(shipped), "--model.init_args.base.name", model]
    elif cls.__module__.startswith("editing."):
        # a method of this package has its config shipped: its absence is a broken install, and the class defaults
        # (e.g. another learning rate, no accumulation) would give other numbers than `editing fit`
        raise ConfigError(f"edit(method={method.value!r}): its shipped config {shipped} is missing; reinstall the "
                          "package (`pip install --force-reinstall canonical_editing-*.whl`) or run from a checkout")
    else:
        log.warning("edit(method=%r): no shipped config %s for a method of one's own; its class defaults apply (pass "
                    "settings=... to change them)", method.value, shipped)
        args = ["--model", f"{cls.__module__}.{cls.__qualname__}", "--model.init_args.base.name", model]
    args += ["--data.task", task, "--budget.balls", json.dumps([key_eps(k) for k in balls]),
             "--seed_everything", str(seed), "--data.seed", str(seed),
             "--trainer.default_root_dir", str(output_dir), "--budget.output_dir", str(output_dir)]
    if data_root is not None:
        args += ["--data.data_root", str(data_root)]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    if overwrite:
        args += ["--budget.overwrite", "true"]
    return args + overrides(dict(settings or {}))


def load_result(run_dir: str | Path, ball: str) -> EditResult:
    """The ``EditResult`` of a finished run folder and one of its balls."""
    from editing.runs.records import RESULTS_FILE, RunRecord

    run_dir = Path(run_dir)
    run = RunRecord.read(run_dir / RESULTS_FILE)
    if ball not in run.edits:
        raise ConfigError(f"{run_dir}: the run saved no edit for ball {ball} (saved: {', '.join(run.edits) or 'none'})")
    result = EditResult(run, run_dir, ball, None)  # type: ignore[arg-type]
    result.module = _load(result.edit_folder(), run.hyperparameters)
    return result


def _load(folder: Path, hparams: Mapping[str, Any]) -> EditedModule:
    from editing.edits.load import load_edited
    from editing.models.loading import ModelConfig

    base = hparams.get("base") if isinstance(hparams, Mapping) else None
    config = ModelConfig(**base) if isinstance(base, Mapping) else None
    return load_edited(folder, base=config)


# --- arguments ------------------------------------------------------------------------------------------------------
def _typed(kind: type, value: Any, argument: str):
    try:
        return kind(value)
    except (ConfigError, ValueError):
        raise ConfigError(f"edit({argument}={value!r}): expected one of {kind.choices()}") from None


def _ball_key(value: float | str, argument: str) -> str:
    from editing.rules.budget import ball_key, key_eps, parse_balls

    if isinstance(value, str):
        try:
            value = key_eps(value)
        except ConfigError:
            raise ConfigError(f"{argument}={value!r}: give the ball's eps as a number, e.g. 1e-4") from None
    return ball_key(parse_balls([value], argument)[0])


def _balls(ball: float, balls: Sequence[float] | None) -> list[str]:
    """The ball keys to track, the chosen ``ball`` first."""
    from editing.rules.budget import ball_key, parse_balls

    chosen = _ball_key(ball, "edit(ball=...)")
    if balls is None:
        return [chosen]
    if isinstance(balls, (str, bytes)) or not isinstance(balls, Sequence):
        raise ConfigError(f"edit(balls={balls!r}): give a list of eps values, e.g. [1e-3, 1e-4, 1e-5]")
    keys = [ball_key(b) for b in parse_balls(list(balls), "edit(balls=...)")]
    if chosen not in keys:
        raise ConfigError(f"edit(ball={ball!r}) is not among balls={list(balls)!r}: add it, or leave balls unset")
    return [chosen] + [k for k in keys if k != chosen]


def _names_a_path(model: str) -> bool:
    """Whether a model name can only mean a local path (a hub id is ``org/name``, a built-in name has no slash)."""
    return model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") > 1


def _run_folder(output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        out = Path(output_dir).expanduser().resolve()
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise ConfigError(f"edit(output_dir={str(output_dir)!r}): {blocking} is a file, and the run folder "
                              "must be a folder; give the path of a folder (made if missing)")
        return out
    DEFAULT_ROOT.mkdir(parents=True, exist_ok=True)
    taken = {p.name for p in DEFAULT_ROOT.iterdir()}
    n = 0
    while f"version_{n}" in taken:
        n += 1
    return (DEFAULT_ROOT / f"version_{n}").resolve()


def _task(out: Path, examples: Examples | None, evaluation: Examples | None, hard_negatives: Examples | None,
          targeted: Examples | None, loss: LossType | str | None, threshold: float | None, name: str) -> str:
    """The ``--data.task`` value: a built-in task or task YAML as given, or a task YAML written into ``out/task``."""
    if examples is None:
        raise ConfigError("edit(examples=...) is missing: give a list of {'prefix': ..., 'suffix': ...} dicts, a "
                          "JSONL file of them, a task YAML or a built-in task's name")
    if isinstance(examples, (str, Path)):
        text = str(examples)
        from editing.rules.tasks import BUILTIN_TASKS

        if text in BUILTIN_TASKS or text.endswith((".yaml", ".yml")):
            given = {k: v for k, v in (("evaluation", evaluation), ("hard_negatives", hard_negatives),
                                       ("targeted", targeted), ("loss", loss), ("threshold", threshold))
                     if v is not None}
            if given:
                raise ConfigError(f"edit({', '.join(given)}=...): a task ({text}) names its own files, loss and "
                                  "threshold; give examples as a list or a JSONL file to set them here")
            if text.endswith((".yaml", ".yml")) and not Path(text).expanduser().is_file():
                raise ConfigError(f"edit(examples={text!r}): no such task YAML")
            return str(Path(text).expanduser().resolve()) if text not in BUILTIN_TASKS else text
    from editing.core.textfiles import not_text

    loss = LossType.GOOD if loss is None else _typed(LossType, loss, "loss")
    if threshold is None:
        threshold = DEFAULT_THRESHOLDS[loss]
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"edit(threshold={threshold!r}): give a finite number (a score at most this succeeds)")
    if not isinstance(name, str) or not name.strip() or not_text(name) is not None:
        raise ConfigError(f"edit(name={name!r}): give the task a non-empty name of UTF-8 text")
    kind = "pair" if loss.pair else "single"
    # every role checked before any file is written
    roles = {"canonical": _rows(examples, "examples", kind),
             "evaluation": _rows(examples, "examples", kind) if evaluation is None else
             _rows(evaluation, "evaluation", kind)}
    if hard_negatives is not None:
        roles["hard_negatives"] = _rows(hard_negatives, "hard_negatives", "suffix_or_text")
    if targeted is not None:
        roles["targeted"] = _rows(targeted, "targeted", "text")
    import yaml

    from editing.core.files import write_text

    folder = out / "task"
    files = {}
    for role, rows in roles.items():
        if isinstance(rows, Path):
            files[role] = str(rows)
        else:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            files[role] = str(write_text(folder / f"{role}.jsonl", text, overwrite=True))
    spec = {"name": name, "loss": loss.value, "threshold": float(threshold), **files}
    return str(write_text(folder / "task.yaml", yaml.safe_dump(spec, sort_keys=False), overwrite=True))


FIELDS = {"single": ("prefix", "suffix"), "pair": ("prefix", "suffix1", "suffix2"), "text": ("text",)}


def _rows(examples: Examples, argument: str, kind: str) -> Path | list[dict]:
    """The given JSONL file (checked to exist), or the example dicts checked for the keys ``kind`` needs."""
    if isinstance(examples, (str, Path)):
        given = Path(examples).expanduser()
        if not given.is_file():
            raise ConfigError(f"edit({argument}={str(examples)!r}): no such JSONL file")
        return given.resolve()
    if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or not examples:
        raise ConfigError(f"edit({argument}=...): give a non-empty list of dicts such as "
                          f"{{{', '.join(repr(k) + ': ...' for k in FIELDS.get(kind, FIELDS['single']))}}}, or a "
                          "JSONL file")
    from editing.core.textfiles import SURROGATE_FIX, not_text

    rows = []
    for i, row in enumerate(examples):
        if not isinstance(row, Mapping):
            raise ConfigError(f"edit({argument}[{i}]={row!r}): each example is a dict with keys "
                              f"{', '.join(FIELDS.get(kind, FIELDS['single']))}")
        needed = FIELDS["text"] if kind == "suffix_or_text" and "text" in row and "suffix" not in row else \
            FIELDS.get(kind, FIELDS["single"])
        for key in needed:
            if not isinstance(row.get(key), str):
                raise ConfigError(f"edit({argument}[{i}]): key {key!r} is missing or not a string; each example needs "
                                  f"{', '.join(needed)}")
            problem = not_text(row[key])
            if problem is not None:
                raise ConfigError(f"edit({argument}[{i}]): key {key!r}: {problem}; {SURROGATE_FIX}")
        rows.append(dict(row))
    return rows


__all__ = ["DEFAULT_THRESHOLDS", "CombinedResult", "EditResult", "combine", "edit", "fit_args", "load_result"]

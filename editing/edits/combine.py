"""Several saved edits applied to one base model (``editing apply --edit A --edit B``, ``editing.api.combine``).

The rule, written once here and in the README:

- Every edit must have been made on the same base model (the same weight fingerprint).
- An edit is given once: two folders holding the same edit (a ``cp -r`` copy: the same tensors and config) are
  refused, naming both, since combining would apply it twice.
- Each edit *touches* tensors of the base model: a changed-tensors edit (full finetuning, MEMIT) the parameters it
  names; a LoRA adapter the weights of the modules it wraps; a sense edit the Backpack's senses.
- Two edits by **different methods** that touch the same tensor are refused, with a message naming both edits and the
  tensor: their changes were each computed against the base model and neither knows of the other, so no order of
  applying them is right.
- A **GRACE codebook** (kind ``grace_codebook``) is applied alone, never combined (``NOT_COMBINABLE`` says why).
- Edits by the **same method** add: changed tensors add their deltas (base + sum of (new - base)); LoRA adapters
  are loaded through peft as separate adapters, all active at once (the model computes W + sum of B_i A_i); sense
  edits are merged into one set of sense deltas (the vectors of a (word, sense) pair both edits chose add).

The combined model's ``reference()`` takes every edit off again, so the base model (p0) is measured on the same
object. ``evaluate_combined`` measures it on each edit's task and the joint degradation (the general NLL of the
combined model against the base model's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.edits.load import EditedModule, read_edit, read_edit_identity
from editing.methods.registry import AppliedEdit, edit_loader
from editing.models.loading import ModelConfig
from editing.rules.budget import degradation
from editing.runs.manifest import content_digest
from editing.runs.records import Metrics, now

SENSES = "<the Backpack's senses>"
"""What a sense edit touches (it adds to sense vectors, not to a parameter)."""
COMBINABLE = ("lora", "tensors", "senses")
NOT_COMBINABLE = {"grace_codebook": "its keys are the base model's activations at its layer and its values were "
                                    "trained against the layers above as they were, so another edit moves the queries "
                                    "off the keys or changes what the values do (and two codebooks' radii were never "
                                    "made apart); grow one codebook over a sequence of edits instead"}
"""Kinds refused in a combination, with the reason the message gives."""


@dataclass(frozen=True)
class EditPart:
    """One saved edit to combine: its folder, kind, method, base identity and verified tensor files."""

    folder: Path
    kind: str
    method: str
    identity: dict
    files: dict[str, dict[str, torch.Tensor]] = field(repr=False)

    def touched(self) -> set[str]:
        """The base model's tensors the edit changes (parameter names of the unwrapped model)."""
        if self.kind == "tensors":
            return set(self.files["edit.safetensors"])
        if self.kind == "senses":
            return {SENSES}
        names = set()
        for key in self.files.get("adapter_model.safetensors", {}):
            # peft's saved keys: base_model.model.<module>.lora_A.weight -> the wrapped <module>.weight
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            names |= {f"{module}.weight", f"{module}.bias"}  # peft wraps the whole module
        return names


def read_parts(edits: Sequence[str | Path], allow_unverified: bool = False) -> list[EditPart]:
    """Read and verify the edits, and refuse a combination that breaks the rule (see the module's docstring).

    Raises:
        ConfigError: fewer than one edit, an edit listed twice (by its path, or a copy of it: the same content),
            edits of different base models, a kind that cannot be combined, or two methods changing one tensor.
    """
    if not edits:
        raise ConfigError("give at least one --edit folder")
    folders = [Path(e) for e in edits]
    seen: dict[Path, Path] = {}
    for folder in folders:
        key = folder.resolve()
        if key in seen:
            raise ConfigError(f"edit {folder} is given twice (also as {seen[key]}); it would be applied twice")
        seen[key] = folder
    parts = []
    contents: dict[str, Path] = {}
    for folder in folders:
        identity, kind, method, files = read_edit(folder, allow_unverified)
        # a copied folder (cp -r A A_copy) is the same edit under another path: compare what the edits hold
        digest = content_digest(folder, files)
        if digest in contents:
            raise ConfigError(f"edits {contents[digest]} and {folder} are the same edit (identical tensors and "
                              f"config, sha256 {digest[:12]}): combined, it would be applied twice; give each edit "
                              "once")
        contents[digest] = folder
        parts.append(EditPart(folder, kind, method or kind, identity, files))
    first = parts[0]
    for part in parts[1:]:
        if part.identity.get("fingerprint") != first.identity.get("fingerprint"):
            raise ConfigError(f"edits {first.folder} and {part.folder} were made on different base models "
                              f"({first.identity.get('name')!r} and {part.identity.get('name')!r}, fingerprints "
                              f"{first.identity.get('fingerprint')} and {part.identity.get('fingerprint')}); only "
                              "edits of one base model combine")
    if len(parts) > 1:
        for part in parts:
            if part.kind not in COMBINABLE:
                why = f": {NOT_COMBINABLE[part.kind]}" if part.kind in NOT_COMBINABLE else ""
                raise ConfigError(f"edit {part.folder} is of kind {part.kind!r}, which cannot be combined with other "
                                  f"edits{why} (combinable kinds: {', '.join(COMBINABLE)}); apply it alone")
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            if a.method == b.method:
                continue
            shared = sorted(a.touched() & b.touched())
            if shared:
                more = f" (and {len(shared) - 1} more)" if len(shared) > 1 else ""
                raise ConfigError(
                    f"edits {a.folder} ({a.method}) and {b.folder} ({b.method}) both change tensor {shared[0]}{more}; "
                    "edits by different methods may not change the same tensor (each was computed against the base "
                    "model alone). Combine edits that touch different tensors, or edits made by one method (theirs "
                    "add)")
    return parts


class CombinedEdit(AppliedEdit):
    """Several edits applied together; p0 is the model with all of them taken off.

    Args:
        model: the model carrying every edit (a peft model when a LoRA adapter is among them).
        applied: the applied edits, in the order they were applied.
    """

    def __init__(self, model: nn.Module, applied: list[AppliedEdit]) -> None:
        super().__init__(model)
        self.applied = applied

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with ExitStack() as stack:
            for applied in reversed(self.applied):  # the last applied (LoRA: the outer wrapper) taken off first
                stack.enter_context(applied.reference())
            yield self.model


def _summed_tensors(parts: list[EditPart], model: nn.Module) -> dict[str, torch.Tensor]:
    """base + the sum over the edits of (new - base), per changed parameter (fp32 arithmetic)."""
    params = dict(model.named_parameters())
    totals: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, new in part.files["edit.safetensors"].items():
            if name not in params or tuple(params[name].shape) != tuple(new.shape):
                raise ConfigError(f"{part.folder}: tensor {name!r} does not fit the base model (missing or of "
                                  "another shape); the edit was made for another model")
            base = params[name].detach().float().cpu()
            totals[name] = totals.get(name, torch.zeros_like(base)) + (new.float() - base)
    return {name: (params[name].detach().float().cpu() + delta).contiguous() for name, delta in totals.items()}


def _merged_senses(parts: list[EditPart]) -> dict[str, torch.Tensor]:
    """One sense edit holding every (word, sense) pair of the edits; a pair chosen by several edits gets the sum."""
    vectors: dict[tuple[int, int], torch.Tensor] = {}
    for part in parts:
        t = part.files["senses.safetensors"]
        for w, s, v in zip(t["vocab_ids"].tolist(), t["sense_ids"].tolist(), t["vectors"].float(), strict=True):
            vectors[(w, s)] = vectors[(w, s)] + v if (w, s) in vectors else v.clone()
    pairs = sorted(vectors)
    dim = next(iter(parts[0].files["senses.safetensors"]["vectors"].shape[1:]), 0)
    return {"vocab_ids": torch.tensor([w for w, _ in pairs], dtype=torch.long),
            "sense_ids": torch.tensor([s for _, s in pairs], dtype=torch.long),
            "vectors": torch.stack([vectors[p] for p in pairs]) if pairs else torch.zeros(0, dim)}


def _apply_adapters(model: nn.Module, parts: list[EditPart], base_name: str, applied: list[AppliedEdit]) -> nn.Module:
    """Load the LoRA adapters as separate peft adapters and make them all active."""
    from peft.utils import get_peft_model_state_dict

    first = edit_loader("lora")(model, parts[0].folder, parts[0].files, base_name)
    peft_model = first.model
    names = ["default"]
    for i, part in enumerate(parts[1:], start=1):
        name = f"edit{i}"
        try:
            peft_model.load_adapter(str(part.folder), adapter_name=name)
        except Exception as err:  # noqa: BLE001 - peft raises several types for adapters that do not fit
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{part.folder}: the LoRA adapter does not fit {base_name!r} ({first_line})") from None
        expected = set(get_peft_model_state_dict(peft_model, adapter_name=name))
        if expected != set(part.files["adapter_model.safetensors"]):
            raise ConfigError(f"{part.folder}: its adapter tensors do not match the modules it names in "
                              f"{base_name!r}; it was made for another model")
        names.append(name)
    peft_model.base_model.set_adapter(names)
    # set_adapter marks the active adapters trainable; a loaded edit is for inference
    for param in peft_model.parameters():
        param.requires_grad_(False)
    peft_model.eval()
    applied.append(first)
    return peft_model


def combine_edits(edits: Sequence[str | Path], base: ModelConfig | None = None,
                  allow_unverified: bool = False) -> tuple[EditedModule, list[EditPart]]:
    """Load the base model once and apply every edit to it by the rule of this module.

    Args:
        edits: edit folders (``<run>/edits/ball_<eps>``).
        base: the base model settings (default: the name recorded in the edits, at fp32).
        allow_unverified: accept edits saved without a manifest (their kind guessed from the file names).

    Returns:
        An ``EditedModule`` carrying all the edits (``reference()`` takes them all off), and the edits read.
    """
    from editing.runs.manifest import edit_digest

    parts = read_parts(edits, allow_unverified)
    if len(parts) == 1:
        from editing.edits.load import load_edited

        return load_edited(parts[0].folder, base, allow_unverified), parts
    identity = parts[0].identity
    module = EditedModule(base or ModelConfig(name=identity["name"], precision="fp32"))
    if module.identity["fingerprint"] != identity.get("fingerprint"):
        raise ConfigError(f"edits {', '.join(str(p.folder) for p in parts)} were made on {identity.get('name')!r} "
                          f"(fingerprint {identity.get('fingerprint')}), not on {module.identity['name']!r} "
                          f"(fingerprint {module.identity['fingerprint']})")
    model, name = module.model, module.identity["name"]
    applied: list[AppliedEdit] = []
    by_kind = {kind: [p for p in parts if p.kind == kind] for kind in COMBINABLE}
    where = " + ".join(str(p.folder) for p in parts)
    if by_kind["tensors"]:
        merged = {"edit.safetensors": _summed_tensors(by_kind["tensors"], model)}
        applied.append(edit_loader("tensors")(model, Path(where), merged, name))
    if by_kind["senses"]:
        merged = {"senses.safetensors": _merged_senses(by_kind["senses"])}
        applied.append(edit_loader("senses")(model, Path(where), merged, name))
    if by_kind["lora"]:
        model = _apply_adapters(model, by_kind["lora"], name, applied)
    module.model = model
    module.applied = CombinedEdit(model, applied)
    module.edit_kind = "combined"
    module.identity["edits"] = [str(p.folder) for p in parts]
    module.identity["edit_sha256"] = edit_digest({f"{i}/{n}": t for i, p in enumerate(parts)
                                                  for n, t in p.files.items()})
    return module, parts


# --- evaluation ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskOutcome:
    """One edit's task measured on the base model, on the combined model and on that edit alone."""

    edit: str
    task: str
    split: str
    base: Metrics
    combined: Metrics
    alone: Metrics | None

    def to_dict(self) -> dict:
        """JSON form."""
        return {"edit": self.edit, "task": self.task, "split": self.split, "base": self.base.to_dict(),
                "combined": self.combined.to_dict(), "alone": None if self.alone is None else self.alone.to_dict()}


@dataclass(frozen=True)
class CombinedRecord:
    """``combined.json``: the edits combined, each task's outcome, and the joint degradation."""

    edits: list[dict]
    tasks: list[TaskOutcome]
    base_general_nll: float | None
    combined_general_nll: float | None
    joint_degradation: float | None
    model: dict
    created: str = field(default_factory=now)

    def to_dict(self) -> dict:
        """JSON form."""
        return {"schema_version": 1, "edits": self.edits, "tasks": [t.to_dict() for t in self.tasks],
                "base_general_nll": self.base_general_nll, "combined_general_nll": self.combined_general_nll,
                "joint_degradation": self.joint_degradation, "model": self.model, "created": self.created}


def _metrics(summary: dict, base_nll: float | None) -> Metrics:
    from editing.core.types import Metric

    nll = summary.get(Metric.GENERAL_NLL)
    change = None if nll is None or base_nll is None else degradation(nll, base_nll)
    return Metrics.of(summary, change)


def evaluate_combined(module: EditedModule, parts: list[EditPart], tasks: Sequence[str], split: str = "val",
                      data_root: str | None = None, eval_limit: int | None = None, general_limit: int | None = None,
                      alone: bool = True, progress: bool = False,
                      chat_template: bool | str = False) -> CombinedRecord:
    """Measure the combined model on each edit's task against the base model (and, with ``alone``, each edit
    applied by itself), and the joint degradation on the general set.

    Args:
        module: the combined edits (``combine_edits``).
        parts: the edits, in the order of ``tasks``.
        tasks: per edit, the task (name or YAML) it is measured on.
        split: ``val`` or ``test``.
        data_root: data folder (default: searched).
        eval_limit: first N examples of the task sets.
        general_limit: first N texts of the general set.
        alone: also load and measure each edit by itself on its task.
        progress: show progress bars.
        chat_template: ask the tasks' prefixes through a chat template (``editing.data.chat``).

    Returns:
        The record; each metric set carries its degradation against the base model's general NLL.
    """
    from editing.core.types import Metric
    from editing.data.datamodule import TaskDataModule
    from editing.edits.load import load_edited
    from editing.evaluation import evaluate

    if len(tasks) != len(parts):
        raise ConfigError(f"{len(parts)} edits but {len(tasks)} tasks: give one --task per --edit, in order")
    outcomes = []
    base_nll = combined_nll = None
    measured: dict[str, tuple] = {}  # task -> its DataModule, base and combined summaries (edits may share a task)
    for part, task in zip(parts, tasks, strict=True):
        if task not in measured:
            dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                                general_limit=general_limit, chat_template=chat_template)
            with module.reference():
                base = evaluate(module, dm, progress=progress)
            measured[task] = (dm, base, evaluate(module, dm, progress=progress))
        dm, base, combined = measured[task]
        base_nll, combined_nll = base[Metric.GENERAL_NLL], combined[Metric.GENERAL_NLL]
        single = None
        if alone and len(parts) > 1:
            one = load_edited(part.folder, ModelConfig(**_base_config(module)))
            single = _metrics(evaluate(one, dm, progress=progress), base_nll)
            del one
        outcomes.append(TaskOutcome(str(part.folder), dm.task.name, split, _metrics(base, base_nll),
                                    _metrics(combined, base_nll), single))
    edits = [{"edit": str(p.folder), "kind": p.kind, "method": p.method} for p in parts]
    joint = None if base_nll is None or combined_nll is None else degradation(combined_nll, base_nll)
    return CombinedRecord(edits, outcomes, base_nll, combined_nll, joint, dict(module.identity))


def _base_config(module: EditedModule) -> dict:
    from dataclasses import asdict

    return asdict(module.base_config)


def edit_task(folder: str | Path) -> str:
    """The task an edit was fitted on, read from its run's ``results.json`` (``<run>/edits/ball_<eps>``): the
    built-in task's name, or the task YAML the fit was given when that file still exists.

    Raises:
        ConfigError: the edit is not inside a run folder, or its task cannot be found; pass ``--task`` then.
    """
    from editing.rules.tasks import BUILTIN_TASKS
    from editing.runs.records import RESULTS_FILE, RunRecord

    folder = Path(folder)
    read_edit_identity(folder)  # a folder that is no edit is reported as such first
    results = folder.resolve().parent.parent / RESULTS_FILE
    fix = f"pass the task to measure edit {folder} on (--task NAME_OR_YAML, one per --edit)"
    if not results.is_file():
        raise ConfigError(f"edit {folder} is not inside a run folder (no {results}), so its task is not known; {fix}")
    run = RunRecord.read(results)
    given = ((run.config or {}).get("data") or {}).get("task")
    if isinstance(given, str) and (given in BUILTIN_TASKS or Path(given).is_file()):
        return given
    if run.task.name in BUILTIN_TASKS:
        return run.task.name
    raise ConfigError(f"the task of edit {folder} ({run.task.name}, given as {given!r}) is not a built-in task and "
                      f"its YAML is not found from here; {fix}")


def fitted_chat_template(folder: str | Path) -> bool | str:
    """The ``data.chat_template`` an edit was fitted with, read from its run's ``results.json``; false for an edit
    outside a run folder (saved by the Python API or copied elsewhere: pass the setting then)."""
    from editing.runs.records import RESULTS_FILE, RunRecord

    results = Path(folder).resolve().parent.parent / RESULTS_FILE
    if not results.is_file():
        return False
    return RunRecord.read(results).chat_template


def write_combined(folder: str | Path, record: CombinedRecord, overwrite: bool = False) -> Path:
    """Write ``combined.json`` atomically (never over an earlier one unless ``overwrite``)."""
    from editing.core.files import write_json

    return write_json(Path(folder) / "combined.json", json.loads(json.dumps(record.to_dict())), overwrite=overwrite)


__all__ = ["COMBINABLE", "CombinedEdit", "CombinedRecord", "EditPart", "TaskOutcome", "combine_edits", "edit_task",
           "evaluate_combined", "read_parts", "write_combined"]

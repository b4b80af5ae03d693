"""Task registry: which files make up a task, how examples are scored, and the success threshold.

The six built-in tasks follow SPEC section 2. A user's own task is a YAML file (see ``load_task_yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

from editing.core.errors import ConfigError
from editing.core.textfiles import load_yaml
from editing.core.types import LossType

LOSS_TYPES: tuple[str, ...] = tuple(m.value for m in LossType)
ROLES: tuple[str, ...] = ("canonical", "evaluation", "targeted", "hard_negatives")
SPLITS: tuple[str, ...] = ("val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its files per role, its loss type and its success threshold.

    File entries are either stems (resolved as ``<data_root>/<name>/split/<stem>-<split>.jsonl``) or paths,
    which may contain ``{split}``; relative paths are taken relative to ``base_dir``.
    """

    name: str
    """Task name (also the folder under the data root for built-in tasks)."""
    loss: LossType
    """How canonical examples are trained on and evaluation examples scored (SPEC sections 4-5)."""
    threshold: float
    """An evaluation example fails when its score is above this value."""
    canonical: str
    """Canonical examples T (prefix/suffix or prefix/suffix1/suffix2 lines)."""
    evaluation: str
    """Evaluation set E (same format as the canonical examples)."""
    targeted: str | None = None
    """Targeted-degradation texts (``text`` lines), optional."""
    hard_negatives: str | None = None
    """Hard negatives: prefix/suffix lines (or ``text`` lines), optional."""
    base_dir: str | None = None
    """Folder that relative paths are resolved against (the YAML's folder for user tasks)."""
    builtin: bool = False
    """Whether the files are stems inside the data root."""

    def __post_init__(self) -> None:
        # a task built in code with a string loss gets the typed value; a misspelt one fails here, not later
        try:
            loss = LossType(self.loss)
        except ConfigError as err:
            raise ConfigError(f"task {self.name!r}: {err}") from None
        object.__setattr__(self, "loss", loss)

    @property
    def pair(self) -> bool:
        """Whether examples carry two suffixes."""
        return self.loss.pair

    def files_without_split(self) -> list[str]:
        """The roles whose file is the same for ``val`` and ``test``: a user task's path without ``{split}``."""
        if self.builtin:
            return []
        return [role for role in ROLES if getattr(self, role) is not None and "{split}" not in getattr(self, role)]

    def file(self, role: str, split: str, data_root: str | Path | None = None) -> Path | None:
        """Resolve the file for ``role`` and ``split``.

        Args:
            role: one of ``ROLES``.
            split: ``val`` or ``test``.
            data_root: root folder of the built-in data (needed for built-in tasks).

        Returns:
            The path, or None when the task has no file for that role.
        """
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} is not valid; expected 'val' or 'test'")
        entry = getattr(self, role)
        if entry is None:
            return None
        if self.builtin:
            if data_root is None:
                raise ConfigError("a data root is needed to resolve built-in task files")
            return Path(data_root) / self.name / "split" / f"{entry}-{split}.jsonl"
        path = Path(entry.format(split=split)).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path


def _builtin(name: str, loss: LossType, threshold: float, canonical: str, evaluation: str, targeted: str,
             hard_negatives: str) -> TaskSpec:
    return TaskSpec(name, loss, threshold, canonical, evaluation, targeted, hard_negatives, builtin=True)


BUILTIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        _builtin("country_capital", LossType.GOOD, -math.log(0.2), "country_capital_fixed",
                 "country_capital_clear_eval", "country_capital_unconditional", "country_capital_hard_neg"),
        _builtin("company_ceo", LossType.GOOD, -math.log(0.05), "company_ceo_train", "company_ceo_eval_clear",
                 "company_ceo_unconditional", "company_ceo_hard_neg_eval_clear"),
        _builtin("temporal", LossType.GOOD, -math.log(0.05), "temporal_train", "temporal_eval_clear",
                 "temporal_unconditional", "temporal_hard_neg_eval_clear"),
        _builtin("stereoset", LossType.BAD, math.log(0.001), "stereoset_train", "stereoset_eval_clear",
                 "stereoset_unconditional", "stereoset_hard_neg"),
        _builtin("pronoun_gender_bias", LossType.BALANCE, math.log(1.5), "pronoun_gender_bias_train",
                 "pronoun_gender_bias_eval", "pronoun_gender_bias_unconditional",
                 "pronoun_gender_bias_hard_neg_eval"),
        _builtin("verb_conjugation", LossType.GOOD_V_BAD, math.log(1 / 16), "verb_conjugation_train",
                 "verb_conjugation_eval", "verb_conjugation_eval_unconditional", "verb_conjugation_hard_neg_eval"),
    )
}


def load_task_yaml(path: str | Path) -> TaskSpec:
    """Read a user task from YAML.

    The YAML holds ``name`` (optional, defaults to the file stem), ``loss`` (good, bad, balance, good-v-bad),
    ``threshold`` (float), ``canonical`` and ``evaluation`` (JSONL paths), and optionally ``targeted`` and
    ``hard_negatives``. Paths are relative to the YAML's folder and may contain ``{split}``.

    Args:
        path: the YAML file.

    Returns:
        The task.
    """
    path = Path(path)
    raw = load_yaml(path, "task YAML")  # names the file and line of a non-UTF-8 byte or a syntax error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys loss, threshold, canonical, evaluation")
    allowed = {f.name for f in fields(TaskSpec)} - {"base_dir", "builtin"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    for key in ("loss", "threshold", "canonical", "evaluation"):
        if key not in raw:
            raise ConfigError(f"{path}: missing key {key!r} (a task needs loss, threshold, canonical, evaluation)")
    try:
        loss = LossType(raw["loss"])
    except ConfigError:
        raise ConfigError(f"{path}: field 'loss' is {raw['loss']!r}; expected one of {LossType.choices()} "
                          "(note the hyphens in good-v-bad)") from None
    try:
        threshold = float(raw["threshold"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: field 'threshold' must be a number, got {raw['threshold']!r}") from err
    return TaskSpec(
        name=str(raw.get("name", path.stem)),
        loss=loss,
        threshold=threshold,
        canonical=str(raw["canonical"]),
        evaluation=str(raw["evaluation"]),
        targeted=None if raw.get("targeted") is None else str(raw["targeted"]),
        hard_negatives=None if raw.get("hard_negatives") is None else str(raw["hard_negatives"]),
        base_dir=str(path.resolve().parent),
    )


def get_task(name_or_path: str) -> TaskSpec:
    """Look up a built-in task by name, or read a user task from a YAML path.

    Args:
        name_or_path: a built-in task name or a ``.yaml``/``.yml`` file.

    Returns:
        The task.
    """
    if name_or_path in BUILTIN_TASKS:
        return BUILTIN_TASKS[name_or_path]
    if name_or_path.endswith((".yaml", ".yml")):
        if not Path(name_or_path).is_file():
            raise ConfigError(f"task file {name_or_path!r} does not exist")
        return load_task_yaml(name_or_path)
    raise ConfigError(
        f"unknown task {name_or_path!r}; expected one of {', '.join(BUILTIN_TASKS)} or a path to a task YAML"
    )


__all__ = ["BUILTIN_TASKS", "LOSS_TYPES", "ROLES", "SPLITS", "LossType", "TaskSpec", "get_task", "load_task_yaml"]

"""Typed names: the loss types of SPEC sections 4-5, the editing methods, the metrics results files report, how a
run ended, which command evaluated and the parts of the cache.

A leaf module (it imports only ``editing.core.errors``) so that every other module can use it. Both enums are
``StrEnum``
(``str`` subclasses): a member compares equal to its plain string, prints as it and serialises to it in JSON, while
an unknown name raises ``ConfigError`` at once instead of falling through a string comparison. Write ``.value`` where
a plain ``str`` is needed (YAML, hyperparameters).
"""

from __future__ import annotations

import re
from enum import StrEnum

from editing.core.errors import ConfigError


class _Name(StrEnum):
    """A named value whose unknown spellings raise ``ConfigError`` listing the valid ones."""

    @classmethod
    def _missing_(cls, value: object) -> _Name:
        raise ConfigError(f"unknown {cls._label()} {value!r}; expected one of {cls.choices()}")

    @classmethod
    def _label(cls) -> str:
        return cls.__name__

    @classmethod
    def choices(cls) -> str:
        """The valid values, comma-separated (for messages)."""
        return ", ".join(m.value for m in cls)


class LossType(_Name):
    """How a task trains (SPEC section 4) and scores (SPEC section 5) its examples.

    ``LossType(value)`` accepts a member or its string and raises ``ConfigError`` for anything else.
    """

    GOOD = "good"
    BAD = "bad"
    BALANCE = "balance"
    GOOD_V_BAD = "good-v-bad"

    @classmethod
    def _label(cls) -> str:
        return "loss type"

    @property
    def pair(self) -> bool:
        """Whether examples of this loss carry two suffixes (suffix1, suffix2)."""
        return self in (LossType.BALANCE, LossType.GOOD_V_BAD)


# Method names declared beyond the built-in members (by ``MethodName.declare``), value -> pseudo-member.
_DECLARED_METHODS: dict[str, MethodName] = {}


class MethodName(_Name):
    """The editing methods (``none`` is the unedited model).

    The members are the built-in methods. A method added outside this package declares its name once, when its
    sub-package registers (``editing.methods.registry.register`` calls ``declare``); from then on ``MethodName(name)``
    returns that name as a ``MethodName`` like any member, and an undeclared name still raises ``ConfigError``.
    """

    NONE = "none"
    FULL = "full"
    LORA = "lora"
    SENSES = "senses"
    MEMIT = "memit"

    @classmethod
    def _label(cls) -> str:
        return "method"

    @classmethod
    def _missing_(cls, value: object) -> MethodName:
        if isinstance(value, str) and value in _DECLARED_METHODS:
            return _DECLARED_METHODS[value]
        return super()._missing_(value)

    @classmethod
    def choices(cls) -> str:
        """The valid values, built-in and declared, comma-separated (for messages)."""
        return ", ".join([m.value for m in cls] + list(_DECLARED_METHODS))

    @classmethod
    def declare(cls, value: str) -> MethodName:
        """The ``MethodName`` of ``value``: a built-in member, or a new name declared by a method added outside the
        package (lowercase letters, digits, ``-`` and ``_``, starting with a letter).

        Raises:
            ConfigError: the name is not of that form.
        """
        if isinstance(value, cls):
            return value
        if value in cls._value2member_map_ or value in _DECLARED_METHODS:
            return cls(value)
        if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9_-]*", value):
            raise ConfigError(f"method name {value!r}: use lowercase letters, digits, '-' and '_', starting with a "
                              "letter (it names the method in results and folders)")
        # a pseudo-member, made the way the enum module makes its members (as Flag does for combined values)
        member = str.__new__(cls, value)
        member._name_ = value.upper().replace("-", "_")
        member._value_ = value
        _DECLARED_METHODS[value] = member
        return member

    @classmethod
    def forget(cls, value: str) -> None:
        """Undo ``declare`` of a name beyond the members (for tests that register a temporary method)."""
        _DECLARED_METHODS.pop(value, None)


class Metric(_Name):
    """The metrics of results files: the four an evaluation measures (SPEC section 5) and the degradation.

    Results files, logs (``val/<metric>``) and tables spell them only through this enum.
    """

    SUCCESS_RATE = "success_rate"
    GENERAL_NLL = "general_nll"
    TARGETED_NLL = "targeted_nll"
    HARD_NEGATIVE_NLL = "hard_negative_nll"
    DEGRADATION = "degradation"
    # what a practitioner reads beside the paper's metrics (issue 14); optional in results files (None when not
    # measured, absent from files written before they existed)
    RELIABILITY = "reliability"
    """The success rate on the canonical examples themselves (the task's threshold)."""
    RELIABILITY_MEAN_SCORE = "reliability_mean_score"
    """The mean score of the canonical examples."""
    GENERALIZATION = "generalization"
    """The paper's success rate on the evaluation set (the same number as ``success_rate``, under the name a
    practitioner reads)."""
    GENERALIZATION_MEAN_SCORE = "generalization_mean_score"
    """The mean score of the evaluation examples."""
    LOCALITY = "locality"
    """The fraction of hard negatives preserved relative to p0 (``editing.evaluation.locality``)."""

    @classmethod
    def _label(cls) -> str:
        return "metric"

    @classmethod
    def evaluated(cls) -> tuple[Metric, ...]:
        """The four an evaluation measures, in the order of results files (the degradation is derived from the
        general NLL and epoch 0's)."""
        return EVALUATED_METRICS


EVALUATED_METRICS: tuple[Metric, ...] = (Metric.SUCCESS_RATE, Metric.GENERAL_NLL, Metric.TARGETED_NLL,
                                         Metric.HARD_NEGATIVE_NLL)
PRACTITIONER_METRICS: tuple[Metric, ...] = (Metric.RELIABILITY, Metric.RELIABILITY_MEAN_SCORE,
                                            Metric.GENERALIZATION_MEAN_SCORE, Metric.LOCALITY)
"""The optional metrics records store (``generalization`` is ``success_rate`` and is not stored twice)."""


class RunStatus(_Name):
    """How a fit ended: it trained every epoch asked for (or stopped early by its patience), or its loss diverged."""

    FINISHED = "finished"
    DIVERGED = "diverged"

    @classmethod
    def _label(cls) -> str:
        return "run status"


class Stage(_Name):
    """Which command wrote an evaluation record: ``editing validate``, ``editing test`` or ``editing apply``."""

    VALIDATE = "validate"
    TEST = "test"
    APPLY = "apply"

    @classmethod
    def _label(cls) -> str:
        return "evaluation stage"


class CacheKind(_Name):
    """The parts of the project's cache folder (``editing cache list`` / ``clear``), one per sub-folder."""

    MODELS = "models"
    """The embedded model dequantized from its GGUF file, and Backpacks distilled into the cache (hours to remake)."""
    TOKENIZERS = "tokenizers"
    DATA = "data"
    """Task data fetched by ``editing data download``."""
    CORPUS_TOKENS = "corpus_tokens"
    TEACHER_CACHE = "teacher_cache"
    """``editing backpack cache-teacher``'s outputs (gigabytes; about 20 minutes to refill)."""
    MEMIT_STATS = "memit_stats"
    SENSE_BACKGROUND = "sense_background"
    EVALUATION = "evaluation"
    """The evaluation caches: p0's metrics, MEMIT's targets, incremental-evaluation captures
    (``$EDITING_EVAL_CACHE_DIR`` when set)."""

    @classmethod
    def _label(cls) -> str:
        return "cache kind"


__all__ = ["EVALUATED_METRICS", "PRACTITIONER_METRICS", "CacheKind", "LossType", "MethodName", "Metric", "RunStatus",
           "Stage"]

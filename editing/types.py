"""Typed names: the loss types of SPEC sections 4-5 and the editing methods.

A leaf module (it imports only ``editing.errors``) so that every other module can use it. Both enums are ``StrEnum``
(``str`` subclasses): a member compares equal to its plain string, prints as it and serialises to it in JSON, while
an unknown name raises ``ConfigError`` at once instead of falling through a string comparison. Write ``.value`` where
a plain ``str`` is needed (YAML, hyperparameters).
"""

from __future__ import annotations

from enum import StrEnum

from editing.errors import ConfigError


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


class MethodName(_Name):
    """The editing methods (``none`` is the unedited model)."""

    NONE = "none"
    FULL = "full"
    LORA = "lora"
    SENSES = "senses"
    MEMIT = "memit"

    @classmethod
    def _label(cls) -> str:
        return "method"


__all__ = ["LossType", "MethodName"]

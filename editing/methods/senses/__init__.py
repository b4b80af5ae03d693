"""Sense finetuning of Backpack language models."""

from editing.core.types import MethodName
from editing.methods.registry import MethodSpec, register
from editing.methods.senses.config import SensesConfig
from editing.methods.senses.deltas import SenseDeltas
from editing.methods.senses.edit import (
    SENSES_KIND,
    apply_sense_edit,
    load_sense_edit,
    save_sense_edit,
    write_senses_edit,
)
from editing.methods.senses.module import SensesEditor

register(MethodSpec(MethodName.SENSES, SensesEditor, SensesConfig, edit_kind=SENSES_KIND,
                    write_edit=write_senses_edit, load_edit=apply_sense_edit))


class SenseFinetune(SensesEditor):
    """The former name of ``SensesEditor`` (the same method); configs and ``--model SenseFinetune`` may still name it.

    A subclass rather than a second name bound to the class, so that the command line finds it by its short name.
    """


__all__ = ["SenseDeltas", "SenseFinetune", "SensesConfig", "SensesEditor", "load_sense_edit", "save_sense_edit"]

"""Sense finetuning of Backpack language models."""

from editing.methods.senses.config import SensesConfig
from editing.methods.senses.deltas import SenseDeltas
from editing.methods.senses.module import SenseFinetune, load_sense_edit, save_sense_edit

__all__ = ["SenseDeltas", "SenseFinetune", "SensesConfig", "load_sense_edit", "save_sense_edit"]

"""Editing methods: one sub-package per method, each registering itself in ``editing.methods.registry``.

The classes below are the built-in methods' public names (``FullFinetune`` and ``SenseFinetune`` are their former
names); ``import_method_packages`` then imports any other sub-package of ``editing/methods/``, so a method added there
registers itself without being listed here.
"""

from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.full import FullEditor, FullFinetune
from editing.methods.lora import LoRAConfig, LoRAEditor
from editing.methods.memit import MEMITConfig, MEMITEditor
from editing.methods.registry import import_method_packages
from editing.methods.senses import SenseFinetune, SensesConfig, SensesEditor

import_method_packages()

__all__ = ["EditingModule", "FullEditor", "FullFinetune", "LoRAConfig", "LoRAEditor", "MEMITConfig", "MEMITEditor",
           "OptimizerConfig", "RegularizationConfig", "SenseFinetune", "SensesConfig", "SensesEditor"]

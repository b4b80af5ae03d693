"""Editing methods: one sub-package per method, registered in ``editing.methods.registry``."""

from editing.methods.base import EditingModule, OptimizerConfig, RegularizationConfig
from editing.methods.full import FullFinetune
from editing.methods.lora import LoRAConfig, LoRAEditor
from editing.methods.memit import MEMITConfig, MEMITEditor
from editing.methods.senses import SenseFinetune, SensesConfig

__all__ = ["EditingModule", "FullFinetune", "LoRAConfig", "LoRAEditor", "MEMITConfig", "MEMITEditor", "OptimizerConfig",
           "RegularizationConfig", "SenseFinetune", "SensesConfig"]

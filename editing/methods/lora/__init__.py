"""LoRA on the MLP projections, through peft."""

from editing.methods.lora.config import LoRAConfig, lora_layers, mlp_target_modules
from editing.methods.lora.module import LoRAEditor

__all__ = ["LoRAConfig", "LoRAEditor", "lora_layers", "mlp_target_modules"]

"""LoRA on the MLP projections, through peft."""

from editing.core.types import MethodName
from editing.methods.lora.config import LoRAConfig, lora_layers, mlp_target_modules
from editing.methods.lora.edit import LORA_KIND, load_lora_edit, merge_lora_edit, write_lora_edit
from editing.methods.lora.module import LoRAEditor
from editing.methods.registry import MethodSpec, register

register(MethodSpec(MethodName.LORA, LoRAEditor, LoRAConfig, edit_kind=LORA_KIND, write_edit=write_lora_edit,
                    load_edit=load_lora_edit, merge_edit=merge_lora_edit))

__all__ = ["LoRAConfig", "LoRAEditor", "lora_layers", "mlp_target_modules"]

"""The one place editing methods are registered: name -> LightningModule class."""

from __future__ import annotations

from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.methods.full import FullFinetune
from editing.methods.lora import LoRAEditor
from editing.methods.memit import MEMITEditor
from editing.methods.senses import SenseFinetune

METHODS: dict[str, type[EditingModule]] = {
    "none": EditingModule,
    "full": FullFinetune,
    "lora": LoRAEditor,
    "senses": SenseFinetune,
    "memit": MEMITEditor,
}


def get_method(name: str) -> type[EditingModule]:
    """The LightningModule class of method ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]

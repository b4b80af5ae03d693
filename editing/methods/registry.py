"""The one place editing methods are registered: name -> LightningModule class."""

from __future__ import annotations

from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.methods.full import FullFinetune
from editing.methods.lora import LoRAEditor
from editing.methods.memit import MEMITEditor
from editing.methods.senses import SenseFinetune
from editing.types import MethodName

METHODS: dict[MethodName, type[EditingModule]] = {
    cls.method: cls for cls in (EditingModule, FullFinetune, LoRAEditor, SenseFinetune, MEMITEditor)
}


def get_method(name: MethodName | str) -> type[EditingModule]:
    """The LightningModule class of method ``name`` (an unknown name raises ``ConfigError``)."""
    method = MethodName(name)
    if method not in METHODS:
        raise ConfigError(f"method {method.value!r} has no registered class; registered: "
                          f"{', '.join(m.value for m in METHODS)}")
    return METHODS[method]

"""Apply a saved edit (a LoRA adapter folder, changed tensors, or sense deltas) to its base model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig


def read_edit_identity(folder: str | Path) -> dict:
    """The base model identity stored beside an edit."""
    path = Path(folder) / "base_model.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not an edit folder: it has no base_model.json")
    return json.loads(path.read_text())


class EditedModule(EditingModule):
    """An ``EditingModule`` carrying a saved edit whose ``reference()`` takes the edit off again, so that p0 is the
    base model (the ensemble's "base Backpack" and the degradation reference need it): the LoRA adapter disabled,
    the sense edit uninstalled, or the changed tensors swapped back to the base values kept at load time."""

    edit_kind: str = "none"
    _base_tensors: dict[str, torch.Tensor] = {}

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        if self.edit_kind == "lora":
            with self.model.disable_adapter():
                yield self.model
        elif self.edit_kind == "senses":
            from editing.methods.senses.selection import backpack_of

            backpack = backpack_of(self.model)
            deltas = backpack.sense_edit
            object.__setattr__(backpack, "sense_edit", None)
            try:
                yield self.model
            finally:
                object.__setattr__(backpack, "sense_edit", deltas)
        elif self.edit_kind == "tensors":
            params = dict(self.model.named_parameters())
            edited = {n: params[n].detach().clone() for n in self._base_tensors}
            with torch.no_grad():
                for n, value in self._base_tensors.items():
                    params[n].copy_(value)
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for n, value in edited.items():
                        params[n].copy_(value)
        else:
            yield self.model


def load_edited(edit: str | Path, base: ModelConfig | None = None) -> EditedModule:
    """Load the base model an edit was made on and apply the edit.

    Args:
        edit: an edit folder written by a fit run (``<run>/edits/ball_<eps>``).
        base: the base model settings (default: the name recorded in the edit, at fp32).

    Returns:
        An ``EditedModule`` whose model carries the edit, ready for ``editing.methods.base.evaluate``; its
        ``reference()`` computes the base model (for an edit of changed tensors, their base values are kept).
    """
    folder = Path(edit)
    identity = read_edit_identity(folder)
    base = base or ModelConfig(name=identity["name"], precision="fp32")
    module = EditedModule(base)
    if module.identity["fingerprint"] != identity.get("fingerprint"):
        raise ConfigError(
            f"edit {folder} was made on {identity.get('name')!r} (fingerprint {identity.get('fingerprint')}), not on "
            f"{module.identity['name']!r} (fingerprint {module.identity['fingerprint']})"
        )
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        module.model = PeftModel.from_pretrained(module.model, str(folder))
        module.model.eval()
        module.edit_kind = "lora"
    elif (folder / "edit.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "edit.safetensors"))
        params = dict(module.model.named_parameters())
        unknown = set(tensors) - set(params)
        if unknown:
            raise ConfigError(f"{folder}/edit.safetensors names tensors the model lacks: {sorted(unknown)[:3]}")
        module._base_tensors = {name: params[name].detach().clone() for name in tensors}
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].dtype))
        module.edit_kind = "tensors"
    elif (folder / "senses.safetensors").is_file():
        from editing.methods.senses import load_sense_edit

        load_sense_edit(folder / "senses.safetensors", module.model)
        module.edit_kind = "senses"
    else:
        raise ConfigError(f"{folder} holds no edit: neither a LoRA adapter (adapter_config.json), edit.safetensors "
                          "nor senses.safetensors")
    module.identity["edit"] = str(folder)
    return module

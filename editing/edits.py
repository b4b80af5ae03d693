"""Apply a saved edit (a LoRA adapter folder, changed tensors, or sense deltas) to its base model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig


def read_edit_identity(folder: str | Path) -> dict:
    """The base model identity stored beside an edit."""
    path = Path(folder) / "base_model.json"
    if not path.is_file():
        raise ConfigError(f"{folder} is not an edit folder: it has no base_model.json")
    return json.loads(path.read_text())


def load_edited(edit: str | Path, base: ModelConfig | None = None) -> EditingModule:
    """Load the base model an edit was made on and apply the edit.

    Args:
        edit: an edit folder written by a fit run (``<run>/edits/ball_<eps>``).
        base: the base model settings (default: the name recorded in the edit, at fp32).

    Returns:
        An ``EditingModule`` whose model carries the edit, ready for ``editing.methods.base.evaluate``.
    """
    folder = Path(edit)
    identity = read_edit_identity(folder)
    base = base or ModelConfig(name=identity["name"], precision="fp32")
    module = EditingModule(base)
    if module.identity["fingerprint"] != identity.get("fingerprint"):
        raise ConfigError(
            f"edit {folder} was made on {identity.get('name')!r} (fingerprint {identity.get('fingerprint')}), not on "
            f"{module.identity['name']!r} (fingerprint {module.identity['fingerprint']})"
        )
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        module.model = PeftModel.from_pretrained(module.model, str(folder))
        module.model.eval()
    elif (folder / "edit.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "edit.safetensors"))
        params = dict(module.model.named_parameters())
        unknown = set(tensors) - set(params)
        if unknown:
            raise ConfigError(f"{folder}/edit.safetensors names tensors the model lacks: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value.to(params[name].dtype))
    elif (folder / "senses.safetensors").is_file():
        from editing.methods.senses import load_sense_edit

        load_sense_edit(folder / "senses.safetensors", module.model)
    else:
        raise ConfigError(f"{folder} holds no edit: neither a LoRA adapter (adapter_config.json), edit.safetensors "
                          "nor senses.safetensors")
    module.identity["edit"] = str(folder)
    return module

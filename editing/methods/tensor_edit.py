"""The changed-tensors edit: new values of some of the base model's parameters, by their names, in
``edit.safetensors`` (edit kind ``tensors``). Full finetuning writes the tensors that moved, MEMIT its edited down
projections (W + Delta W); both register this loader for the kind, so either edit loads the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.methods.registry import AppliedEdit, edit_file

TENSORS_KIND = "tensors"
TENSOR_EDIT_FILE = "edit.safetensors"


def write_tensor_edit(folder: Path, tensors: dict[str, torch.Tensor], method: str, fingerprint: str) -> Path:
    """Write ``tensors`` (parameter name -> new value) as ``edit.safetensors``.

    Args:
        folder: the edit folder (it exists).
        tensors: the new parameter values, by the base model's parameter names.
        method: the method that made them (file metadata).
        fingerprint: the base model's weight fingerprint (file metadata).
    """
    from safetensors.torch import save_file

    save_file(tensors, str(folder / TENSOR_EDIT_FILE), metadata={"method": method, "base_fingerprint": fingerprint})
    return folder / TENSOR_EDIT_FILE


class AppliedTensors(AppliedEdit):
    """Changed tensors written into the model; the base values are kept so that ``reference()`` can swap them back.

    Args:
        model: the model carrying the new values.
        base_tensors: the base values of the changed parameters, by name.
    """

    def __init__(self, model: nn.Module, base_tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(model)
        self.base_tensors = base_tensors

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        params = dict(self.model.named_parameters())
        edited = {n: params[n].detach().clone() for n in self.base_tensors}
        # the base values follow the model when it moved (e.g. onto the ensemble's GPU), once, not every call
        self.base_tensors = {n: v.to(params[n].device) for n, v in self.base_tensors.items()}
        with torch.no_grad():
            for n, value in self.base_tensors.items():
                params[n].copy_(value)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for n, value in edited.items():
                    params[n].copy_(value)


def merge_tensor_edit(applied: AppliedEdit) -> nn.Module:
    """The model with the changed tensors (the ``merge_edit`` of kind ``tensors``): the loader wrote the new values
    into the base model's own parameters, so the applied model is the merged one."""
    return applied.model


def load_tensor_edit(model: nn.Module, folder: Path, tensors: dict[str, dict[str, torch.Tensor]],
                     base_name: str) -> AppliedTensors:
    """Replace the model's parameters named in ``edit.safetensors`` (the ``load_edit`` of kind ``tensors``)."""
    path, values = folder / TENSOR_EDIT_FILE, edit_file(folder, tensors, TENSOR_EDIT_FILE)
    params = dict(model.named_parameters())
    unknown = set(values) - set(params)
    if unknown:
        raise ConfigError(f"{path} names tensors the model lacks: {sorted(unknown)[:3]}; it was made for another "
                          "model")
    for name, value in sorted(values.items()):
        if tuple(value.shape) != tuple(params[name].shape):
            raise ConfigError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, but the model's parameter has "
                              f"shape {tuple(params[name].shape)}; the edit was made for another model or damaged, "
                              "re-export it from its fit run")
    base_tensors = {name: params[name].detach().clone() for name in values}
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.to(params[name].dtype))
    return AppliedTensors(model, base_tensors)

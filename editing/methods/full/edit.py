"""Full finetuning's edit: the tensors that differ from p0, saved as a changed-tensors edit
(``editing.methods.tensor_edit``)."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.methods.full.module import FullEditor
from editing.methods.tensor_edit import write_tensor_edit


def write_full_edit(module: FullEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save the changed tensors as ``edit.safetensors`` (the ``write_edit`` of full finetuning)."""
    write_tensor_edit(folder, module.changed_tensors(state), module.method.value, module.identity["fingerprint"])

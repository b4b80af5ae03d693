"""MEMIT's edit: the edited down-projection weights (W + Delta W), saved as a changed-tensors edit
(``editing.methods.tensor_edit``), as full finetuning's are, so either loads the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.methods.memit.module import MEMITEditor
from editing.methods.tensor_edit import write_tensor_edit


def write_memit_edit(module: MEMITEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save W + Delta W of every edited layer by the base model's parameter names (the ``write_edit`` of MEMIT)."""
    write_tensor_edit(folder, module.edited_tensors(state), module.method.value, module.identity["fingerprint"])

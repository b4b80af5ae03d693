"""MEMIT's edit: the edited down-projection weights (W + Delta W), saved as a changed-tensors edit
(``editing.methods.tensor_edit``), as full finetuning's are, so either loads the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.methods.memit.layers import down_projection, down_projection_name, is_transposed
from editing.methods.memit.module import MEMITEditor
from editing.methods.tensor_edit import write_tensor_edit


def write_memit_edit(module: MEMITEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save W + Delta W of every edited layer by the base model's parameter names (the ``write_edit`` of MEMIT)."""
    tensors = {}
    for layer, delta in module.weight_deltas(state).items():
        projection = down_projection(module.model, layer)
        weight = projection.weight.detach().float().cpu()
        tensors[f"{down_projection_name(module.model, layer)}.weight"] = (
            weight + (delta.T if is_transposed(projection) else delta)).contiguous()
    write_tensor_edit(folder, tensors, module.method.value, module.identity["fingerprint"])

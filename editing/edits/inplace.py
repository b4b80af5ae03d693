"""``edit(..., inplace=True)``: a saved edit written into the caller's own model, merged into its weights.

The edit is loaded onto a fresh copy of its (held) base model and merged by the method's registered ``merge_edit``
(as ``editing export --merged`` does); the merged weights are then copied into the caller's tensors, which keep their
dtype and device (a bf16 model gets the fp32 merged weights rounded to bf16), so the caller's model object, its
hooks and its other references stay what they were.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.edits.export import edit_merger
from editing.edits.load import load_edited


def write_into(model: nn.Module, edit: str | Path) -> nn.Module:
    """Write the edit in folder ``edit`` into ``model`` (a plain transformers model of the edit's base).

    Args:
        model: the caller's model, of the architecture of the edit's base model.
        edit: an edit folder (``<run>/edits/ball_<eps>``) of a weight-change method.

    Returns:
        ``model`` itself, now carrying the edit.

    Raises:
        ConfigError: an edit that is not a weight change, or a model whose tensors do not match the base's.
    """
    from editing.runs.manifest import recorded_kind

    folder = Path(edit)
    kind, method = recorded_kind(folder)
    merge = edit_merger(kind or "?", method, str(folder))
    module = load_edited(folder)
    merged = merge(module.applied).state_dict()
    own = model.state_dict()
    if own.keys() != merged.keys() or any(own[k].shape != merged[k].shape for k in own):
        raise ConfigError(f"edit(inplace=True): the model's tensors do not match those of the edit's base model "
                          f"({folder}); was the model changed during the edit? The edit is kept in {folder}")
    with torch.no_grad():
        for name, value in merged.items():
            own[name].copy_(value.to(own[name].device, own[name].dtype))
    return model

"""AlphaEdit's saved edit: W + Delta W of the edited projections as a changed-tensors edit (loaded by
``editing.methods.tensor_edit`` like MEMIT's), plus ``alphaedit_keys.safetensors``: per edited layer the keys a
later step of a sequence passes as Kp (``AlphaEditEditor.sequence_keys``), read back by ``read_sequence_keys``."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.core.errors import ConfigError
from editing.methods.alphaedit.module import KEYS_FILE, AlphaEditEditor
from editing.methods.memit.edit import write_memit_edit
from editing.runs.manifest import read_safetensors


def write_alphaedit_edit(module: AlphaEditEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The ``write_edit`` of AlphaEdit: MEMIT's tensors, and the sequence keys (``layer.<l>``: (m, d_in) float64)."""
    from safetensors.torch import save_file

    write_memit_edit(module, folder, state)
    keys = {f"layer.{layer}": k.contiguous() for layer, k in module.sequence_keys(state).items()}
    save_file(keys, str(Path(folder) / KEYS_FILE), metadata={"method": module.method.value})


def read_sequence_keys(folder: str | Path) -> dict[int, torch.Tensor]:
    """The keys an AlphaEdit edit folder holds for the next step of a sequence (layer -> (m, d_in)).

    Raises:
        ConfigError: the folder has no keys file (not an AlphaEdit edit).
    """
    path = Path(folder) / KEYS_FILE
    if not path.is_file():
        raise ConfigError(f"{folder} holds no {KEYS_FILE}: pass an edit folder saved by an AlphaEdit fit")
    return {int(name.split(".", 1)[1]): t for name, t in read_safetensors(path).items()}

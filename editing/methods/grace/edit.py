"""GRACE's saved edit (kind ``grace_codebook``): the codebook in ``grace_codebook.safetensors`` (keys, values, eps,
labels, and the wrapped layer and span rule as tensors, so the edit manifest's hash covers them too), applied by
attaching the codebook to the base model's down projection of that layer.

A codebook is consulted at run time, position by position; it is not a change of weights, so a plain transformers
model cannot carry it and ``editing export --merged`` refuses it (``merge_edit`` is None). Generation
(``editing generate``) recomputes every position of the context at each new token, so the codebook is consulted at
each new position under its span rule, as in scoring.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.methods.grace.codebook import BUFFERS, CODEBOOK_FILE, SPANS, Codebook, attach, projection_widths
from editing.methods.grace.module import GRACEEditor
from editing.methods.registry import AppliedEdit, edit_file
from editing.models.architecture import down_projection, num_layers

GRACE_KIND = "grace_codebook"


def write_grace_edit(module: GRACEEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The ``write_edit`` of GRACE: the codebook of ``state`` (default: current) with its layer and span rule."""
    from safetensors.torch import save_file

    book = module.codebook_state(state)
    tensors = {name: book[name].detach().cpu().contiguous() for name in BUFFERS}
    tensors["layer"] = torch.tensor(module.grace_layer, dtype=torch.long)
    tensors["span"] = torch.tensor(SPANS.index(module.codebook.span), dtype=torch.long)
    save_file(tensors, str(Path(folder) / CODEBOOK_FILE), metadata={"method": module.method.value})


class AppliedCodebook(AppliedEdit):
    """A codebook attached to the base model's down projection; p0 is the model with the codebook off.

    Args:
        model: the model carrying the codebook.
        codebook: the attached codebook.
    """

    def __init__(self, model: nn.Module, codebook: Codebook) -> None:
        super().__init__(model)
        self.codebook = codebook

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with self.codebook.disabled():
            yield self.model


def load_grace_edit(model: nn.Module, folder: Path, tensors: dict[str, dict[str, torch.Tensor]],
                    base_name: str) -> AppliedCodebook:
    """Attach the codebook of ``folder`` to ``model`` (the ``load_edit`` of kind ``grace_codebook``)."""
    path, t = folder / CODEBOOK_FILE, edit_file(folder, tensors, CODEBOOK_FILE)
    missing = sorted((set(BUFFERS) | {"layer", "span"}) - set(t))
    if missing:
        raise ConfigError(f"{path} is not a GRACE codebook: it lacks {missing}; re-export the edit")
    layer, span, total = int(t["layer"]), int(t["span"]), num_layers(model.config)
    if not 0 <= layer < total:
        raise ConfigError(f"{path} wraps layer {layer}, but {base_name!r} has {total} layers; the edit was made for "
                          "another model")
    if not 0 <= span < len(SPANS):
        raise ConfigError(f"{path}: span code {span} is none of {list(range(len(SPANS)))}; re-export the edit")
    module = down_projection(model, layer)
    d_in, d_out = projection_widths(module)
    n = t["keys"].shape[0]
    shapes = {"keys": (n, d_in), "values": (n, d_out), "eps": (n,)}
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise ConfigError(f"{path}: {name} has shape {tuple(t[name].shape)}, layer {layer} of {base_name!r} "
                              f"needs {shape}; the edit was made for another model")
    if t["labels"].dim() != 2 or t["labels"].shape[0] != n:
        raise ConfigError(f"{path}: labels have shape {tuple(t['labels'].shape)}, expected ({n}, length); "
                          "re-export the edit")
    codebook = Codebook(d_in, d_out, SPANS[span]).to(next(model.parameters()).device)
    codebook.set_entries(t["keys"], t["values"], t["eps"], t["labels"])
    attach(module, codebook)
    return AppliedCodebook(model, codebook)

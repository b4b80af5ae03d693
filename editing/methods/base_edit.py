"""A fit on top of an earlier edit (``editing fit --base_edit DIR``, issue 38 item 4: sequential editing).

The rule, for the weight-change methods (full, LoRA, MEMIT, ROME, AlphaEdit):

- The base edit's weights (the cumulative weight change of its sequence) are written into the module's frozen base
  weights before the fit starts: the model the new fit starts from, and trains on top of, is the edited one.
- p0 stays the ORIGINAL base model: ``reference()`` swaps the original weights back in (full finetuning's frozen
  copy was taken before the base edit was written, so it is the original already). The degradation balls, the KL
  term and MEMIT's statistics C are all measured against the model the user started from.
- The new fit's saved edit is a changed-tensors edit (kind ``tensors``) holding the cumulative weights: every
  parameter the base edit or the new edit changed, at its final value. So ``load_edited``/``editing apply`` load
  step k of a sequence alone, onto the original base model. Its manifest records the chain (``sequence``: each
  earlier step's folder, manifest SHA-256 and method, oldest first).

A method whose edit is no weight change continues only an edit of its own kind (``continues_from``): GRACE grows
one codebook over the sequence (the base edit's entries, then the new fit's), and saves the whole codebook in its
own format, p0 being the model with the codebook off. Sense edits cannot be continued (``can_continue`` false); each
refusal gives the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError


@dataclass(frozen=True)
class BaseEdit:
    """A saved edit a fit continues from, read and verified (``editing.edits.base_edit.read_base_edit``).

    Attributes:
        folder: the edit folder given as ``--base_edit``.
        manifest_sha256: SHA-256 of its ``edit_manifest.json`` (which holds the hashes of its tensors): a changed
            or re-exported folder has another one.
        method: the method that made it.
        tensors: the base model's parameters it changes, at their edited values, by the base model's names.
        files: its verified tensor files (file name -> tensors): AlphaEdit reads its sequence keys there.
        sequence: the steps before it (each ``{"edit", "manifest_sha256", "method"}``), oldest first.
        kind: its edit kind (as its manifest records it).
        weights: whether ``tensors`` is the whole edit (a weight change); False for an edit of another form (a GRACE
            codebook), which only a fit of its own method continues.
    """

    folder: str
    manifest_sha256: str
    method: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    files: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    sequence: list[dict] = field(default_factory=list)
    kind: str = "tensors"
    weights: bool = True

    @property
    def continues(self) -> str:
        """What a fit continuing it must accept (``EditingModule.continues_from``): ``weights``, or its kind."""
        return "weights" if self.weights else self.kind

    def step(self) -> dict:
        """This edit as an entry of a later step's ``sequence``."""
        return {"edit": self.folder, "manifest_sha256": self.manifest_sha256, "method": self.method}

    def chain(self) -> list[dict]:
        """The ``sequence`` of an edit made on top of this one: its steps, then itself."""
        return [*self.sequence, self.step()]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def base_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """The parameter of the base model named ``name`` (its plain transformers name) inside ``model``, which may
    carry an editing method's wrappers (peft replaces an adapted module by a layer holding it as ``base_layer``)."""
    path, _, leaf = name.rpartition(".")
    try:
        module = model.get_submodule(path) if path else model
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    param = getattr(module, leaf, None)
    return param if isinstance(param, nn.Parameter) else None


class WeightSwap:
    """The base edit written into a model's parameters, with the original values kept to swap back in.

    Swapping assigns ``.data`` (no copy, no in-place write): a graph that saved a weight is not invalidated, and
    the original tensors are back bit for bit.

    Args:
        params: the parameters, by name.
        values: their edited values, by name.
    """

    def __init__(self, params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
        self.params = params
        self.originals = {n: p.data for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.data = values[n].to(p.device, p.dtype).clone()

    @contextmanager
    def original(self) -> Iterator[None]:
        """A context in which the parameters hold their original values."""
        edited = {n: p.data for n, p in self.params.items()}
        for n, p in self.params.items():
            if self.originals[n].device != p.device:  # the module moved (e.g. onto the GPU): the originals follow
                self.originals[n] = self.originals[n].to(p.device)
            p.data = self.originals[n]
        try:
            yield
        finally:
            for n, p in self.params.items():
                p.data = edited[n]


def write_into(model: nn.Module, base_edit: BaseEdit, where: str) -> WeightSwap:
    """Write ``base_edit``'s tensors into ``model``'s base parameters.

    Raises:
        ConfigError: a tensor the model lacks, or of another shape (naming ``--base_edit`` and the fix).
    """
    params = {}
    for name, value in sorted(base_edit.tensors.items()):
        param = base_parameter(model, name)
        if param is None or tuple(param.shape) != tuple(value.shape):
            raise ConfigError(f"{where}: its tensor {name!r} does not fit this fit's base model (missing or of another "
                              "shape); give an edit made on the same base model (--model.init_args.base.name), or "
                              "fit without --base_edit")
        params[name] = param
    return WeightSwap(params, base_edit.tensors)


__all__ = ["BaseEdit", "WeightSwap", "base_parameter", "file_sha256", "write_into"]

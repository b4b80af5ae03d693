"""An evaluation's linear layers through MKL's packed weights (the product mode ``backend.PACKED``, issue 37).

MKL's GEMM lays its weight operand out anew on every call; a packed weight is laid out once. The evaluation's
weights do not change during a pass, so ``packed_linears`` packs each fp32 ``nn.Linear`` weight of the model (and a
plain linear LM head) on entry, runs the layers through ``backend.packed_product`` and puts the layers back on exit.
Packing happens on entry, so a LoRA adapter merged for the evaluation (``evaluation_weights``) is packed merged;
packing again per evaluation costs one copy of the weights. The packed product gives the default's bits on the CPU
measured, and its error against float64 is checked with every other mode's before it can be chosen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from editing.evaluation import backend


def _packed_forward(weight: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                    x: torch.Tensor) -> torch.Tensor:
    return backend.packed_product(x, weight, packed, bias)


def packable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass with its own forward) with fp32 CPU weights not already patched."""
    if type(module) is not nn.Linear or "forward" in module.__dict__:
        return False
    bias = module.bias
    return (module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and (bias is None or bias.dtype == torch.float32))


@contextmanager
def packed_linears(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the context, every ``packable`` linear layer of ``model`` runs MKL's packed product; yields how many.

    The model's weights must not change inside the context (evaluation only; gradients do not flow through the
    packed product). ``enabled`` False (or a torch without MKL) runs the model as it is.
    """
    patched: list[nn.Module] = []
    try:
        if enabled and backend.packing_available():
            for module in model.modules():
                if packable(module):
                    module.forward = partial(_packed_forward, module.weight, backend.pack(module.weight), module.bias)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


__all__ = ["packable", "packed_linears"]

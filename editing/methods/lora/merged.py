"""A LoRA adapter merged into its base weights for the length of an evaluation (issue 37 item 3).

Each adapted linear layer computes ``W x + scale * B (A x)``: at rank r a second, rank-r product per layer and
token. For an evaluation (no gradients) the merged weight ``W + scale * B A`` gives the same function to fp32
rounding at the cost of one product per layer, computed once per evaluation. The original weight tensor is kept and
put back on exit (never recovered by subtracting, which would round), so the base weights stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _adapted_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every active adapter of ``model``'s LoRA layers is merged into its base weight and the
    layers run only the base product; on exit the original weight tensors are back (same tensors, same bits).

    Layers that are already merged, have adapters disabled, or use a LoRA variant (DoRA) are left as they are.
    """
    saved: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in _adapted_layers(model):
                active = [a for a in layer.active_adapters if a in layer.lora_A]
                if layer.merged or layer.disable_adapters or not active or any(a in layer.lora_variant for a in active):
                    continue
                weight = layer.get_base_layer().weight
                merged = weight.data.clone()
                for name in active:
                    # peft's own delta (scale * B A, transposed for fan-in-fan-out weights), in the weight's dtype
                    merged += layer.get_delta_weight(name).to(merged.dtype)
                saved.append((layer, weight.data))
                weight.data = merged
                # peft's forward then calls only the base layer (its "merged" path)
                layer.merged_adapters = list(active)
        yield model
    finally:
        for layer, original in saved:
            layer.get_base_layer().weight.data = original
            layer.merged_adapters = []

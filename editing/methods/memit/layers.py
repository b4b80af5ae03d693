"""Where MEMIT reads and writes: the transformer blocks and their MLP down projections (located by
``editing.models.architecture``), and forward passes that capture (or stop at) a block."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.models.architecture import blocks, down_projection, down_projection_name, located_types
from editing.models.architecture import model_type as architecture_model_type

__all__ = ["add_to_block_output", "add_to_down_output", "blocks", "down_projection", "down_projection_name",
           "forward_until", "hooks", "is_transposed", "model_type", "projection_shape"]


def model_type(model: nn.Module) -> str:
    """The Hugging Face model type, checked against the families whose blocks and down projections are located
    (``editing.models.architecture``)."""
    kind = architecture_model_type(model)
    if kind not in located_types():
        raise ConfigError(f"MEMIT does not know where the MLP down projection of model type {kind!r} is; "
                          f"supported: {', '.join(located_types())}")
    return kind


def is_transposed(module: nn.Module) -> bool:
    """Whether the projection stores its weight as (in, out) (GPT-2's Conv1D) rather than (out, in)."""
    return not isinstance(module, nn.Linear)


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(out features, in features) of a projection."""
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if is_transposed(module) else (weight.shape[0], weight.shape[1])


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last needed block has run."""


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    """Remove the given hook handles on exit."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_until(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_block: int | None,
                  on_block_output: dict[int, Callable] | None = None,
                  on_down_input: dict[int, Callable] | None = None,
                  on_down_output: dict[int, Callable] | None = None) -> None:
    """Run the model on a batch, calling the given functions on block outputs and down-projection inputs, and stop
    after block ``last_block`` (None: run the whole model) since later blocks cannot change what was captured.

    Args:
        model: the causal LM.
        input_ids: (b, s) token ids.
        attention_mask: (b, s) 1 for real tokens.
        last_block: the deepest block whose activations are needed.
        on_block_output: layer -> function of the block's hidden-state output (b, s, d).
        on_down_input: layer -> function of the down projection's input (b, s, d_mlp).
        on_down_output: layer -> function of the down projection's output (b, s, d), after the hooks registered
            before it (an edit's hooks: the output of the projection as edited).
    """
    handles = []
    for layer, fn in (on_block_output or {}).items():
        handles.append(blocks(model)[layer].register_forward_hook(
            lambda _m, _a, out, fn=fn: fn(out[0] if isinstance(out, tuple) else out)))
    for layer, fn in (on_down_input or {}).items():
        handles.append(down_projection(model, layer).register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0])))
    for layer, fn in (on_down_output or {}).items():
        handles.append(down_projection(model, layer).register_forward_hook(lambda _m, _a, out, fn=fn: fn(out)))
    if last_block is not None:
        def stop(_module, _args, _out):
            raise _Stop

        handles.append(blocks(model)[last_block].register_forward_hook(stop))
    with hooks(handles):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Stop:
            pass


def add_to_block_output(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Register a hook replacing block ``layer``'s hidden-state output ``h`` by ``fn(h)``; returns its handle."""

    def hook(_module, _args, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + tuple(out[1:])
        return fn(out)

    return blocks(model)[layer].register_forward_hook(hook)


def add_to_down_output(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Register a hook replacing the down projection of ``layer``'s output ``v`` by ``fn(v)`` (ROME's value site);
    returns its handle."""
    return down_projection(model, layer).register_forward_hook(lambda _m, _a, out: fn(out))

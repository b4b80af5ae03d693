"""What the package knows about model architectures, in one place: per model family the transformer blocks and the
MLP projections inside them, how many layers a config declares, where a Backpack sits inside a (wrapped) model, and
how the LM head's input is captured and the head applied in fp32.

Methods read it rather than keep tables of their own: LoRA adapts a family's MLP projections, MEMIT edits the last of
them (the down projection) and hooks the blocks, sense finetuning and the ensemble find the Backpack, and distillation
counts the layers it copies. A new family is supported by one entry in ``ARCHITECTURES``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from editing.core.errors import ConfigError

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
"""The config fields that hold the number of transformer layers, in the order they are looked for."""


@dataclass(frozen=True)
class Architecture:
    """Where the parts of one model family live (paths relative to the Hugging Face model)."""

    mlp: tuple[str, ...]
    """The MLP projections inside a block, input side first; the last one is the down (output) projection."""
    blocks: str | None = None
    """Path of the list of transformer blocks (None: not located for this family)."""

    @property
    def down_projection(self) -> str:
        """The MLP down (output) projection inside a block."""
        return self.mlp[-1]


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.layers"),
    "mistral": Architecture(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.layers"),
    "qwen2": Architecture(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), "model.layers"),
    "gpt2": Architecture(("mlp.c_fc", "mlp.c_proj"), "transformer.h"),
    # a Backpack's contextualizer is a GPT-2; its blocks are not located (MEMIT does not edit Backpacks)
    "backpack-gpt2": Architecture(("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": Architecture(("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "gpt_neox.layers"),
    "gptj": Architecture(("mlp.fc_in", "mlp.fc_out"), "transformer.h"),
}


def mlp_modules(model_type: str) -> tuple[str, ...] | None:
    """The MLP projection names (module-name suffixes) of ``model_type``, or None for an unknown family."""
    arch = ARCHITECTURES.get(model_type)
    return arch.mlp if arch is not None else None


def num_layers(config) -> int:
    """Number of transformer layers of a Hugging Face config.

    Raises:
        ConfigError: the config declares none of ``LAYER_KEYS``.
    """
    for key in LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"cannot tell the number of layers of a {type(config).__name__}")


def base_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a wrapper (a peft model keeps it one level down), or ``model`` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def model_type(model: nn.Module) -> str | None:
    """The Hugging Face model type of ``model`` (unwrapped), or None."""
    return getattr(getattr(base_model(model), "config", None), "model_type", None)


def located_types() -> list[str]:
    """The model types whose transformer blocks are located."""
    return [name for name, arch in ARCHITECTURES.items() if arch.blocks is not None]


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of ``model``, in order.

    Raises:
        ConfigError: the family's blocks are not located.
    """
    arch = ARCHITECTURES.get(model_type(model))
    if arch is None or arch.blocks is None:
        raise ConfigError(f"the transformer blocks of model type {model_type(model)!r} are not located; "
                          f"supported: {', '.join(located_types())}")
    return base_model(model).get_submodule(arch.blocks)


def down_projection_name(model: nn.Module, layer: int) -> str:
    """Name (relative to the unwrapped model) of block ``layer``'s MLP down projection."""
    arch = ARCHITECTURES[model_type(model)]
    return f"{arch.blocks}.{layer}.{arch.down_projection}"


def down_projection(model: nn.Module, layer: int) -> nn.Module:
    """Block ``layer``'s MLP down projection (a Linear, or a transposed Conv1D for GPT-2)."""
    return base_model(model).get_submodule(down_projection_name(model, layer))


def backpack_of(model: nn.Module):
    """The ``BackpackModel`` inside ``model`` (a Backpack LM, possibly wrapped), or None."""
    from editing.models.backpack import BackpackModel

    for module in model.modules():
        if isinstance(module, BackpackModel):
            return module
    return None


# --- the LM head: where the scorer, the regularizer, MEMIT and the ensemble read the final hidden states ------------
@contextmanager
def capture_final_hidden(model):
    """Within the context, a forward pass stores the LM head's input in ``store['hidden']`` and the head itself
    computes nothing (it receives an empty slice)."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) to score with")
    store: dict = {}

    def pre_hook(module, args):
        store["hidden"] = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield store
    finally:
        handle.remove()


_MISSING = object()


def _passthrough(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def entering_at(stack: nn.ModuleList, start: int, hidden: torch.Tensor):
    """Within the context, the blocks of ``stack`` below ``start`` pass their input through and block ``start``
    receives ``hidden`` as its input: a forward pass computes only from block ``start`` up (a frozen prefix's
    stored hidden states, the evaluation's incremental caches and the target optimization's suffix pass). The
    blocks need to return a plain tensor for the pass-through to be what the model's loop expects; a block's own
    ``forward`` attribute (e.g. accelerate's device hooks) is put back in place on exit."""
    skipped = stack[:start]
    saved = [block.__dict__.get("forward", _MISSING) for block in skipped]

    def pre(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = stack[start].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for block in skipped:
            block.forward = _passthrough
        yield
    finally:
        handle.remove()
        for block, old in zip(skipped, saved, strict=True):
            if old is _MISSING:
                block.__dict__.pop("forward", None)
            else:
                block.forward = old


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the model's LM head to ``hidden`` (n, d) in fp32."""
    head = model.get_output_embeddings()
    if hasattr(head, "logits_from_hidden"):  # a composite head (the ensemble) computes its own fp32 logits
        return head.logits_from_hidden(hidden)
    patched = getattr(head, "__dict__", {}).get("forward")
    if patched is not None and head.weight.dtype == torch.float32:
        return patched(hidden.float())  # an evaluation's packed head (editing.evaluation.packed); no hooks run
    bias = getattr(head, "bias", None)
    return F.linear(hidden.float(), head.weight.float(), None if bias is None else bias.float())

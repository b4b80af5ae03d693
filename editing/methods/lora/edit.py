"""LoRA's edit: a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, edit kind ``lora``),
which ``PeftModel.from_pretrained(base, folder)`` loads elsewhere too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError
from editing.methods.lora.module import LoRAEditor
from editing.methods.registry import AppliedEdit

LORA_KIND = "lora"
ADAPTER_FILE = "adapter_model.safetensors"


def write_lora_edit(module: LoRAEditor, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Save the adapter as a peft folder (the ``write_edit`` of LoRA)."""
    current = None
    if state is not None:
        current = module.delta_state()
        module.load_delta_state(state)
    try:
        module.model.save_pretrained(str(folder))
    finally:
        if current is not None:
            module.load_delta_state(current)


class AppliedAdapter(AppliedEdit):
    """A loaded LoRA adapter; p0 is the model with the adapter disabled."""

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        with self.model.disable_adapter():
            yield self.model


def load_lora_edit(model: nn.Module, folder: Path, tensors: dict[str, dict[str, torch.Tensor]],
                   base_name: str) -> AppliedAdapter:
    """Load a peft LoRA adapter onto ``model`` (the ``load_edit`` of kind ``lora``); one made for another
    architecture is refused (peft would skip tensors whose modules the model lacks, leaving an adapter that changes
    nothing)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    other = (f"it was made for another model than {base_name!r} (was base_model.json copied from another edit?); "
             "apply it to the model it was trained on")
    adapter = tensors.get(ADAPTER_FILE)
    if adapter is None:
        raise ConfigError(f"{folder} has adapter_config.json but no {ADAPTER_FILE}; re-export the edit")
    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except Exception as err:  # noqa: BLE001 - peft raises ValueError/RuntimeError/KeyError for adapters that do not fit
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{folder}: the LoRA adapter does not fit {base_name!r} ({first}); {other}") from None
    expected = get_peft_model_state_dict(model)
    missing, unknown = sorted(set(expected) - set(adapter)), sorted(set(adapter) - set(expected))
    if missing or unknown:
        example = (unknown or missing)[0]
        raise ConfigError(f"{folder}/{ADAPTER_FILE}: its tensors do not match the adapter modules of "
                          f"{base_name!r} ({len(unknown)} unknown, {len(missing)} missing, e.g. {example}); {other}")
    model.eval()
    return AppliedAdapter(model)


def merge_lora_edit(applied: AppliedEdit) -> nn.Module:
    """The base model with ``W + (alpha / r) B A`` in each adapted weight (the ``merge_edit`` of kind ``lora``);
    the adapter's modules are removed, so the result is the base architecture itself."""
    return applied.model.merge_and_unload()

"""Apply a saved edit (a LoRA adapter folder, changed tensors, or sense deltas) to its base model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig


def read_edit_identity(folder: str | Path) -> dict:
    """The base model identity stored beside an edit (``base_model.json``)."""
    path = Path(folder) / "base_model.json"
    if not Path(folder).is_dir():
        raise ConfigError(f"edit folder {folder} does not exist; pass an edit folder (<run>/edits/ball_<eps>)")
    if not path.is_file():
        raise ConfigError(f"{folder} is not an edit folder: it has no base_model.json")
    fix = "it is written with the edit by the fit; restore it from the run folder or re-export the edit"
    try:
        identity = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); {fix}") from None
    if not isinstance(identity, dict) or not isinstance(identity.get("name"), str) or "fingerprint" not in identity:
        raise ConfigError(f"{path}: expected an object with the base model's 'name' and 'fingerprint'; {fix}")
    return identity


class EditedModule(EditingModule):
    """An ``EditingModule`` carrying a saved edit whose ``reference()`` takes the edit off again, so that p0 is the
    base model (the ensemble's "base Backpack" and the degradation reference need it): the LoRA adapter disabled,
    the sense edit uninstalled, or the changed tensors swapped back to the base values kept at load time."""

    edit_kind: str = "none"
    _base_tensors: dict[str, torch.Tensor] = {}

    @contextmanager
    def reference(self) -> Iterator[nn.Module]:
        if self.edit_kind == "lora":
            with self.model.disable_adapter():
                yield self.model
        elif self.edit_kind == "senses":
            from editing.methods.senses.selection import backpack_of

            backpack = backpack_of(self.model)
            deltas = backpack.sense_edit
            object.__setattr__(backpack, "sense_edit", None)
            try:
                yield self.model
            finally:
                object.__setattr__(backpack, "sense_edit", deltas)
        elif self.edit_kind == "tensors":
            params = dict(self.model.named_parameters())
            edited = {n: params[n].detach().clone() for n in self._base_tensors}
            with torch.no_grad():
                for n, value in self._base_tensors.items():
                    params[n].copy_(value)
            try:
                yield self.model
            finally:
                with torch.no_grad():
                    for n, value in edited.items():
                        params[n].copy_(value)
        else:
            yield self.model


def load_edited(edit: str | Path, base: ModelConfig | None = None, allow_unverified: bool = False) -> EditedModule:
    """Load the base model an edit was made on and apply the edit.

    The edit's tensors are checked first against the hashes recorded when it was saved, and for NaN/Inf
    (``editing.integrity.verify_edit``).

    Args:
        edit: an edit folder written by a fit run (``<run>/edits/ball_<eps>``).
        base: the base model settings (default: the name recorded in the edit, at fp32).
        allow_unverified: load an edit that has no manifest (saved by an older version), with a warning.

    Returns:
        An ``EditedModule`` whose model carries the edit, ready for ``editing.methods.base.evaluate``; its
        ``reference()`` computes the base model (for an edit of changed tensors, their base values are kept).
        ``identity["edit_sha256"]`` is a hash of the edit's tensors.
    """
    from editing.integrity import edit_digest, verify_edit

    folder = Path(edit)
    identity = read_edit_identity(folder)
    if not any((folder / name).is_file() for name in ("adapter_config.json", "edit.safetensors",
                                                      "senses.safetensors")):
        raise ConfigError(f"{folder} holds no edit: neither a LoRA adapter (adapter_config.json), edit.safetensors "
                          "nor senses.safetensors; pass an edit folder of a fit run (<run>/edits/ball_<eps>)")
    files = verify_edit(folder, allow_unverified)
    base = base or ModelConfig(name=identity["name"], precision="fp32")
    module = EditedModule(base)
    if module.identity["fingerprint"] != identity.get("fingerprint"):
        raise ConfigError(
            f"edit {folder} was made on {identity.get('name')!r} (fingerprint {identity.get('fingerprint')}), not on "
            f"{module.identity['name']!r} (fingerprint {module.identity['fingerprint']})"
        )
    if (folder / "adapter_config.json").is_file():
        _apply_adapter(module, folder, files.get("adapter_model.safetensors"))
    elif "edit.safetensors" in files:
        _apply_tensors(module, folder / "edit.safetensors", files["edit.safetensors"])
    elif "senses.safetensors" in files:
        from editing.methods.senses import load_sense_edit

        load_sense_edit(folder / "senses.safetensors", module.model, tensors=files["senses.safetensors"])
        module.edit_kind = "senses"
    else:  # its tensor file is listed in no manifest entry we could read
        raise ConfigError(f"{folder}: the edit's tensor file is missing; re-export the edit")
    module.identity["edit"] = str(folder)
    module.identity["edit_sha256"] = edit_digest(files)
    return module


def _apply_adapter(module: EditedModule, folder: Path, tensors: dict[str, torch.Tensor] | None) -> None:
    """Load a peft LoRA adapter onto the module's model; one made for another architecture is refused (peft would
    skip tensors whose modules the model lacks, leaving an adapter that changes nothing)."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    name = module.identity["name"]
    other = (f"it was made for another model than {name!r} (was base_model.json copied from another edit?); apply "
             "it to the model it was trained on")
    if tensors is None:
        raise ConfigError(f"{folder} has adapter_config.json but no adapter_model.safetensors; re-export the edit")
    try:
        module.model = PeftModel.from_pretrained(module.model, str(folder))
    except Exception as err:  # noqa: BLE001 - peft raises ValueError/RuntimeError/KeyError for adapters that do not fit
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{folder}: the LoRA adapter does not fit {name!r} ({first}); {other}") from None
    expected = get_peft_model_state_dict(module.model)
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unknown:
        example = (unknown or missing)[0]
        raise ConfigError(f"{folder}/adapter_model.safetensors: its tensors do not match the adapter modules of "
                          f"{name!r} ({len(unknown)} unknown, {len(missing)} missing, e.g. {example}); {other}")
    module.model.eval()
    module.edit_kind = "lora"


def _apply_tensors(module: EditedModule, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the model's parameters named in ``edit.safetensors`` (full finetuning, MEMIT)."""
    params = dict(module.model.named_parameters())
    unknown = set(tensors) - set(params)
    if unknown:
        raise ConfigError(f"{path} names tensors the model lacks: {sorted(unknown)[:3]}; it was made for another "
                          "model")
    for name, value in sorted(tensors.items()):
        if tuple(value.shape) != tuple(params[name].shape):
            raise ConfigError(f"{path}: tensor {name!r} has shape {tuple(value.shape)}, but the model's parameter has "
                              f"shape {tuple(params[name].shape)}; the edit was made for another model or damaged, "
                              "re-export it from its fit run")
    module._base_tensors = {name: params[name].detach().clone() for name in tensors}
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
    module.edit_kind = "tensors"

"""A model the caller already holds (``edit(model=<a loaded transformers or peft model>, tokenizer=...)``), made a base
model that ``load_model`` can load: a snapshot of it is held in this process under a name that is a digest of what
it computes, ``memory:<digest>``.

The name covers the weights (their content hash, ``editing.models.loading.fingerprint``, of the fp32 values), the
config (every entry but the name or path it was read from, the transformers version and the dtype: the weights are
held in fp32 whatever dtype they came in) and the tokenizer (its vocabulary and rules, special tokens, padding and
truncation sides, chat template). Two models that differ in any of these are two bases, so an edit or a cache entry
of one is never taken for the other; the same model given twice is one base, loaded once. The caches key on the
weights' fingerprint and the config themselves, and on the token ids, so they follow the same rule.

A peft model is held as its active adapters merged into its base weights (``merge_and_unload`` of a copy): the edit
applies on top of what the model computes, and an export is a plain model carrying both.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import torch

from editing.core.errors import ConfigError
from editing.models.loading import (
    HELD_PREFIX,
    LoadedModel,
    context_length,
    fingerprint,
    held_model,
    hold_loaded,
    unmark_gguf,
)

# entries that name where the config was read from or how it was stored, not what the model computes
UNNAMED_CONFIG = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash")


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft model (peft imported only when it is already in use)."""
    import sys

    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def is_loaded_model(model: Any) -> bool:
    """Whether ``model`` is a model object (as opposed to a name or path)."""
    return isinstance(model, torch.nn.Module)


def config_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config, without the entries that only say where it came from (``UNNAMED_CONFIG``)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in UNNAMED_CONFIG}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """SHA-256 of what the tokenizer does: a fast tokenizer's whole serialized pipeline (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor), else its vocabulary; its special tokens, sides and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    rules = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    described = {"class": type(tokenizer).__name__, "rules": rules, "special": tokenizer.special_tokens_map,
                 "added": sorted((str(k), str(v)) for k, v in tokenizer.added_tokens_decoder.items()),
                 "padding_side": tokenizer.padding_side, "truncation_side": tokenizer.truncation_side,
                 "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _dequantized_gguf(model: torch.nn.Module) -> bool:
    """Whether the model was read from a GGUF file: transformers dequantizes its tensors on load (plain floating
    weights) but leaves the model marked quantized."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def _quantized(model: torch.nn.Module) -> bool:
    if _dequantized_gguf(model):
        return any(not p.is_floating_point() for p in model.parameters())
    return getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None or \
        any(not p.is_floating_point() for p in model.parameters())


def _snapshot(model: torch.nn.Module, where: str) -> torch.nn.Module:
    """A copy of ``model`` in fp32 on the CPU (a peft model: its active adapters merged), the caller's untouched."""
    if _quantized(model):
        raise ConfigError(f"{where}: the model is quantized ({type(model).__name__} with a quantization_config), and "
                          "an edit trains and measures weights in fp32; load it without quantization (e.g. "
                          "AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)) and pass that")
    if len({p.device for p in model.parameters()} | {b.device for b in model.buffers()}) > 1 or \
            any(p.device.type == "meta" for p in model.parameters()):
        raise ConfigError(f"{where}: the model is spread over several devices or offloaded (device_map); load it "
                          "onto one device (or the CPU) and pass that, or pass its folder as model=")
    snapshot = copy.deepcopy(model)
    if is_peft_model(snapshot):
        try:
            snapshot = snapshot.merge_and_unload()
        except Exception as err:  # noqa: BLE001 - peft raises ValueError/AttributeError for adapters it cannot merge
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{where}: a peft model is edited on top of its active adapters merged into the base "
                              f"weights, and these cannot be merged ({first}); merge or remove them yourself and "
                              "pass the plain model") from None
    if _dequantized_gguf(snapshot):
        unmark_gguf(snapshot)
    snapshot = snapshot.to("cpu", torch.float32)
    snapshot.requires_grad_(False)
    snapshot.eval()
    if hasattr(snapshot.config, "dtype"):
        snapshot.config.dtype = torch.float32
    return snapshot


def _plain_fp32_cpu(model: torch.nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors if t.is_floating_point())


def hold_model(model: Any, tokenizer: Any, where: str = "edit(model=...)") -> LoadedModel:
    """Hold ``model`` (a transformers model, or a peft model) with ``tokenizer`` as a base that ``load_model`` loads
    by its ``memory:`` name; the caller's objects are never changed.

    The model is copied only when no model of the same digest is held already: a second edit of the same model
    loads nothing (its fingerprint is hashed again, which sees any change of its weights).

    Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        where: how error messages name the argument.

    Returns:
        The held model (its ``identity["name"]`` is the name to load).

    Raises:
        ConfigError: a model that is not a causal LM with a config, quantized, spread over devices, or a peft model
            whose adapters cannot be merged.
    """
    if not is_loaded_model(model) or not hasattr(getattr(model, "config", None), "to_dict"):
        raise ConfigError(f"{where}: {type(model).__name__} is not a transformers model; give a causal LM loaded "
                          "with transformers (AutoModelForCausalLM.from_pretrained), a peft model of one, or a model "
                          "name or folder")
    source_of = getattr(model.config, "_name_or_path", "") or "?"
    direct = not is_peft_model(model) and not _dequantized_gguf(model) and _plain_fp32_cpu(model)
    snapshot = None if direct else _snapshot(model, where)
    weights = fingerprint(model if direct else snapshot)
    digests = {"fingerprint": weights, "config_sha256": config_sha256(snapshot or model),
               "tokenizer_sha256": tokenizer_sha256(tokenizer)}
    name = HELD_PREFIX + hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:32]
    held = held_model(name)
    if held is not None:
        return hold_loaded(held)
    if snapshot is None:
        snapshot = _snapshot(model, where)
    kind = "a peft model, its active adapters merged" if is_peft_model(model) else "a model"
    identity = {"name": name, "source": f"{kind} held in memory ({type(model).__name__}, from {source_of!r})",
                **digests}
    tok = copy.deepcopy(tokenizer)
    return hold_loaded(LoadedModel(snapshot, tok, context_length(snapshot.config), identity))

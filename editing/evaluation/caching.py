"""The evaluation caches of a fit (issue 13): p0's evaluation computed once per model and data, and each epoch's
evaluation computed incrementally (``editing.evaluation.incremental``).

**p0 cache.** p0's evaluation (epoch 0) depends only on the base model and the data, not on the method, its
hyperparameters or the seed: every fit, sweep trial and seed on the same model and data reuses it. What is cached is
the ``Evaluator``'s metric states after the pass (sums, token counts, per-example scores of every set), so a fit that
reads them computes its summary with today's code, and a metric added later changes the key (the key lists every
metric's states). A method whose p0 is the base model (all built-in ones; ``EditingModule.p0_is_base``) computes
epoch 0 on its model before any step, which is then p0 bit for bit, and stores it; one whose p0 differs is never
served from the cache.

**What each key covers, and why that is enough** (issue 34; the table of every cache is in docs/architecture.md):

- *p0* (``<root>/p0/``): the model (its weights' content hash from loading, config, precision, dtype, device type
  with the GPU model, TF32 and autocast settings, attention implementation), the data (task, loss, threshold; per
  evaluated role the file's SHA-256 and the exact token ids of every example with its scored positions, so limits,
  the tokenizer, context length and truncation are in it), the batching (``max_tokens``, ``max_examples``), the
  evaluator's metrics and their states, the number of processes (it orders the reduction), the library versions
  (torch, transformers, Python) and the digest of the evaluation code (``EVALUATION_CODE``: the evaluator, scorer,
  metrics, losses and all they import in the package, including a function patched in at run time). p0's numbers
  are a function of exactly these: the weights and the token ids enter the forward pass, the rest decides how it is
  computed and summed.
- *prefix* (``<root>/prefix/<key>/``): the same model and data material, the first block the edit may change, and
  the content hash of every weight outside the blocks from there up, taken on the live model at each epoch: the
  captured hidden states depend only on those weights and the token ids.
- *senses* (``<root>/senses/<key>/``): the same, the content hash of the whole live state (deltas excluded, they are
  not in the model's state dict) and of the selected (word, sense) pairs in their order, which fix the columns the
  deltas are added to.
- *memit_targets* (``<root>/memit_targets/``, written by ``editing.methods.memit``): the model material, the digest
  of the target code (``editing.methods.memit.compute``), the exact rows (token ids and positions), the loss and the
  target settings; entries holding NaN/Inf are never served.

Every entry is one safetensors file written and read by ``editing.caches.entries``: its material and the content hash of
its tensors are in its metadata and checked when it is read, so an entry damaged, truncated or changed since it was
written is a miss (recomputed, with a warning naming the file), and a full or read-only cache folder costs the entry,
never the run.

Entries are single files written atomically (``editing.core.files``): concurrent workers may both compute an entry and
write it, and either copy is the same; an interrupted writer leaves nothing behind, so a half-written entry is never
read. Under DDP the first process decides whether the entry exists and reads or writes it.

Switches: ``--budget.p0_cache``, ``--budget.incremental``, ``--budget.cache_memory_mb`` (``DegradationBudget``), and
``$EDITING_EVAL_CACHES=off`` (both off, e.g. for ``benchmarks/fit_time.py``'s reference runs). Files go under
``$EDITING_EVAL_CACHE_DIR``, by default ``<cache>/evaluation``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from array import array
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from editing.caches.entries import read_entry, write_entry
from editing.caches.keys import numerics
from editing.core.digests import code_digest, library_versions
from editing.core.paths import evaluation_cache_dir
from editing.evaluation.evaluator import Evaluator
from editing.evaluation.incremental import (
    COUNTERS,
    BatchStore,
    FrozenPrefix,
    PrefixScorer,
    SenseEdit,
    SenseScorer,
    Shortcut,
    key_of,
    prefix_digest,
    tensor_digest,
)
from editing.evaluation.products import chosen_mode
from editing.evaluation.scorer import TokenScorer
from editing.models.architecture import base_model

log = logging.getLogger(__name__)

SWITCH_ENV = "EDITING_EVAL_CACHES"
EVALUATION_CODE = ("editing.evaluation.caching",)
"""The modules whose code computes what the evaluation caches hold (with everything they import in the package):
their digest is in every key, so a change to the evaluator, the scorer, the losses or the metrics (or a function
patched in at run time) is a miss, never a stale hit."""


@dataclass
class CacheSettings:
    """Which evaluation caches a fit uses (``DegradationBudget``'s ``p0_cache``, ``incremental``,
    ``cache_memory_mb``)."""

    p0: bool = True
    """Reuse p0's evaluation from an earlier fit on the same model and data."""
    incremental: bool = True
    """Evaluate each epoch by computing only what the edit can change."""
    memory_mb: float = 1024.0
    """Memory budget (MiB) of this process's incremental-evaluation entries; entries beyond it go to disk."""

    def effective(self) -> CacheSettings:
        """These settings with ``$EDITING_EVAL_CACHES=off`` applied (it turns both caches off)."""
        if os.environ.get(SWITCH_ENV, "").strip().lower() in ("off", "0", "false", "no"):
            return dataclasses.replace(self, p0=False, incremental=False)
        return self


def cache_root() -> Path:
    """Folder of the evaluation caches: ``$EDITING_EVAL_CACHE_DIR``, else ``<cache>/evaluation``."""
    return evaluation_cache_dir()


# --- what a cached result depends on ------------------------------------------------------------------------------
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "use_cache", "architectures")


def model_material(model: nn.Module, identity: dict) -> dict:
    """The model's part of a cache key: weights (the load-time fingerprint), config, precision and where it runs."""
    inner = base_model(model)
    config = {k: v for k, v in inner.config.to_dict().items() if k not in _VOLATILE_CONFIG}
    param = next(model.parameters())
    return {
        "fingerprint": identity.get("fingerprint"), "model_type": identity.get("model_type"),
        "precision": identity.get("precision"), "dtype": str(param.dtype), "device": param.device.type,
        "numerics": numerics(param.device),
        # the product mode changes the last bits of every evaluation (editing.evaluation.products)
        "products": chosen_mode(param.device),
        "config": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16],
        "attention": getattr(inner.config, "_attn_implementation", None),
        "libraries": library_versions(), "code": code_digest(*EVALUATION_CODE),
    }


def _examples_digest(examples) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.index}:{int(e.is_text)}:{e.truncated}:{len(e.sequences)}|".encode())
        for s in e.sequences:
            digest.update(f"{s.score_from}:".encode())
            digest.update(array("q", s.ids).tobytes())
    return digest.hexdigest()[:16]


def data_material(datamodule, roles: list[str] | None = None) -> dict:
    """The data's part of a cache key: the task's scoring, each evaluated file's hash and tokenized examples, and
    the batching.

    Args:
        datamodule: the task's DataModule, attached to a tokenizer.
        roles: the evaluated roles (default: the task's evaluation roles).
    """
    task = datamodule.task
    hashed = {}
    for role in roles or datamodule.eval_roles():
        loaded = datamodule.load(role)
        hashed[role] = {"sha256": loaded.sha256, "examples": len(loaded.examples),
                        "tokens": _examples_digest(loaded.examples)}
    return {"task": task.name, "loss": getattr(task.loss, "value", str(task.loss)), "threshold": float(task.threshold),
            "roles": hashed, "max_tokens": datamodule.max_tokens, "max_examples": datamodule.max_examples,
            "max_length": datamodule.max_length}


def evaluator_material(evaluator: Evaluator) -> dict:
    """The evaluator's part of the p0 key: every metric and its states (a new metric or state is a new key)."""
    return {name: sorted(metric._defaults) for name, metric in evaluator.metrics.items()}


def _process() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(value):
    rank, world = _process()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --- the base model's numbers -------------------------------------------------------------------------------------
class CacheEntry:
    """Named tensors computed from the base model, one file per key (``<root>/<kind>/<key>.safetensors``; the key's
    material is in the file's metadata and is checked on reading).

    Args:
        kind: the sub-folder (what is cached: ``p0``, ``memit_targets``).
        material: everything the tensors depend on.
        finite: an entry holding NaN or infinite values is never served (numbers that cannot be such, e.g. targets).
    """

    def __init__(self, kind: str, material: dict, finite: bool = False) -> None:
        self.kind = kind
        self.finite = finite
        self.material = material
        self.key = key_of(material)
        self.path = cache_root() / kind / f"{self.key}.safetensors"

    def load_tensors(self) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None (absent, unreadable, made for other material, or changed since written:
        ``editing.caches.entries.read_entry`` checks the content hash and says why it misses)."""
        return read_entry(self.path, self.material, what=f"{self.kind} cache entry", finite=self.finite)

    def store_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the tensors (atomically; a full or read-only cache folder only costs the entry, with a warning)."""
        write_entry(self.path, tensors, self.material, what=f"{self.kind} cache entry")


class P0Cache(CacheEntry):
    """p0's metric states (``<root>/p0/<key>.safetensors``).

    Args:
        material: everything p0's evaluation depends on (see the module doc).
    """

    def __init__(self, material: dict) -> None:
        super().__init__("p0", material)

    def load(self) -> dict[str, dict[str, torch.Tensor]] | None:
        """The cached states, or None (absent, unreadable, or made for other material)."""
        tensors = self.load_tensors()
        if tensors is None:
            return None
        states: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            metric, state = name.split(".", 1)
            states.setdefault(metric, {})[state] = tensor
        return states

    def store(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write the states (atomically; an entry another process wrote meanwhile is kept)."""
        self.store_tensors({f"{metric}.{state}": t for metric, d in states.items() for state, t in d.items()})


# --- one epoch's evaluation -------------------------------------------------------------------------------------
def make_scorer(model: nn.Module, shortcut: Shortcut | None, identity: dict, data: dict,
                settings: CacheSettings) -> TokenScorer | None:
    """The incremental scorer for ``shortcut`` (None when there is none, or it cannot be exact here)."""
    if shortcut is None:
        return None
    rank, world = _process()
    common = {"model": model_material(model, identity), "data": data, "process": [rank, world]}
    budget = int(settings.memory_mb * 2**20)
    if isinstance(shortcut, FrozenPrefix):
        if shortcut.start <= 0:
            return None  # nothing below the first changed block
        material = {**common, "kind": "prefix", "start": shortcut.start,
                    "prefix": prefix_digest(model, shortcut.start)}
        key = key_of(material)
        return PrefixScorer(model, shortcut.start, BatchStore(key, cache_root() / "prefix" / key, budget))
    if isinstance(shortcut, SenseEdit):
        if next(model.parameters()).dtype != torch.float32:
            return None  # the decomposition is exact to fp32 rounding only in fp32
        selection = tensor_digest([("vocab", shortcut.vocab_ids), ("sense", shortcut.sense_ids)])
        material = {**common, "kind": "senses", "weights": tensor_digest(sorted(model.state_dict().items())),
                    "selection": selection, "pairs": int(shortcut.vocab_ids.numel())}
        key = key_of(material)
        return SenseScorer(model, shortcut, BatchStore(key, cache_root() / "senses" / key, budget))
    raise TypeError(f"unknown evaluation shortcut {shortcut!r}")


def evaluate_epoch(subject, datamodule, epoch: int, settings: CacheSettings | None = None,
                   roles: list[str] | None = None, progress: bool = False, announce: bool = True) -> dict:
    """Evaluate ``subject``'s model on ``datamodule``'s evaluation sets for ``epoch``, with the evaluation caches.

    Epoch 0 (p0) is read from the p0 cache when an earlier fit on the same model and data stored it (and stored
    otherwise); every epoch's pass uses the method's shortcut (``subject.evaluation_shortcut()``) when there is one.
    The summary equals a plain ``editing.evaluation.evaluate`` to fp32 rounding (p0 from the cache: exactly).

    Args:
        subject: an ``EditingModule`` (its ``model``, ``identity``, ``tokenizer``, ``max_length``,
            ``evaluation_shortcut()`` and ``p0_is_base``).
        datamodule: the task's DataModule.
        epoch: 0 for p0 (before any step), else the epoch just trained.
        settings: which caches to use (default: all; ``$EDITING_EVAL_CACHES=off`` turns them off).
        roles: which roles to evaluate (default: the task's evaluation roles; see ``TaskDataModule.eval_roles``).
        progress: show a progress bar per role.
        announce: print on the first process whether p0 was computed or reused.

    Returns:
        The evaluation summary (``Evaluator.summary``).
    """
    settings = (settings or CacheSettings()).effective()
    if datamodule.tokenizer is None:
        datamodule.attach(subject.tokenizer, subject.max_length)
    model = subject.model
    evaluator = Evaluator(datamodule.task)
    evaluator.to(next(model.parameters()).device)
    data = data_material(datamodule, roles) if settings.p0 or settings.incremental else {}
    scorer = None
    if settings.incremental:
        shortcut = getattr(subject, "evaluation_shortcut", lambda: None)()
        scorer = make_scorer(model, shortcut, subject.identity, data, settings)
    if epoch != 0:
        # a method may offer faster weights of the same function for a pass without gradients (LoRA: merged)
        with getattr(subject, "evaluation_weights", nullcontext)():
            return evaluator.run(model, datamodule, roles, progress=progress, scorer=scorer)
    if not settings.p0 or not getattr(subject, "p0_is_base", False):
        return evaluator.run(model, datamodule, roles, progress=progress, scorer=scorer)
    rank, world = _process()
    # the number of processes orders the sums of the reduction, so a cached p0 equals a fresh one bit for bit
    cache = P0Cache({"model": model_material(model, subject.identity), "data": data,
                     "evaluator": evaluator_material(evaluator), "processes": world})
    states = cache.load() if rank == 0 else None
    if _broadcast(states is not None):
        if rank == 0:
            evaluator.load_states(states)
        COUNTERS["p0_reused"] += 1
        if announce and rank == 0:
            print(f"p0 (epoch 0): reused from the p0 cache ({cache.path})", flush=True)
        return evaluator.summary()
    evaluator.run(model, datamodule, roles, progress=progress, scorer=scorer, summarize=False)
    states = evaluator.states()
    if rank == 0:
        cache.store(states)
    COUNTERS["p0_computed"] += 1
    if announce and rank == 0:
        print(f"p0 (epoch 0): computed and stored in the p0 cache ({cache.path})", flush=True)
    return evaluator.summary()

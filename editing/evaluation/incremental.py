"""Exact incremental evaluation (issue 13): score an edited model by computing only what its edit can change.

A method says what its edit leaves alone (``EditingModule.evaluation_shortcut``):

- ``FrozenPrefix(start)``: the embeddings and blocks ``0 .. start-1`` never change (LoRA on a block of layers, MEMIT's
  layers, a full finetune restricted to some blocks). The hidden states entering block ``start`` are then the same
  in every epoch: they are captured once per batch (during a pass the evaluation makes anyway) and each later pass
  runs only the blocks from ``start`` up. Blocks below ``start`` are swapped for a pass-through and a forward pre-hook
  puts the captured hidden state in at block ``start``'s input, so embeddings, rotary tables and masks are computed
  by the model's own code as usual. The blocks from ``start`` up see bit for bit the input a full pass gives them.
- ``SenseEdit``: a Backpack sense edit (SPEC section 8) changes only the selected sense vectors; alpha (the
  contextualization) is frozen. The output at position t is ``h_t = sum_l sum_j alpha[l, t, j] C'(x_j)_l``, so the
  edit adds ``sum over selected pairs s of W[t, s] * delta_s`` with ``W[t, s] = sum_{j: x_j = w_s} alpha[l_s, t, j]``.
  One pass of p0 per batch records each scored token's p0 NLL, and for the positions whose ``W`` row is not zero
  their p0 hidden state and ``W`` row. Each later evaluation recomputes only those rows (one small matmul, then the
  LM head); every other position's NLL is p0's, bit for bit (its terms are the same products as p0's).

Results equal a full evaluation to fp32 rounding (tests/caches/test_eval_caches.py checks every method, every epoch).
What is captured lives in a ``BatchStore``: in this process's memory while the memory budget allows, else on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from editing.caches.entries import read_entry, write_entry
from editing.core.digests import tensor_sha256
from editing.core.errors import ConfigError
from editing.data.batching import IGNORE
from editing.evaluation.scorer import capture_final_hidden, head_nll, scored_nll, token_nll
from editing.models.architecture import backpack_of, blocks, entering_at

log = logging.getLogger(__name__)

COUNTERS: Counter = Counter()
"""What the evaluation caches did in this process: ``p0_computed``, ``p0_reused``, ``prefix_captured``,
``prefix_reused``, ``senses_built``, ``senses_reused`` (batches), ``full_passes`` (batches a shortcut could not
serve). Tests and benchmarks read it."""


# --- what a method's edit leaves alone ---------------------------------------------------------------------------
@dataclass(frozen=True)
class FrozenPrefix:
    """The edit never changes the embeddings or blocks ``0 .. start-1``."""

    start: int
    """The first block the edit may change."""


@dataclass
class SenseEdit:
    """A sense edit of a Backpack: additive deltas on selected (word, sense) pairs, alpha frozen."""

    vocab_ids: torch.Tensor
    """(S,) word of each selected pair."""
    sense_ids: torch.Tensor
    """(S,) sense index of each selected pair."""
    vectors: torch.Tensor
    """(S, d) the deltas (the live parameter: read at each evaluation)."""
    reference: Callable[[], AbstractContextManager]
    """A context in which the model computes p0 (the deltas switched off)."""


Shortcut = FrozenPrefix | SenseEdit


def first_changed_block(model: nn.Module, changed: Iterable[torch.Tensor]) -> int | None:
    """The lowest transformer block holding one of the ``changed`` parameters, or None when one of them lies outside
    the blocks (an embedding, the LM head: nothing is then frozen for sure), none is given, or the family's blocks
    are not located."""
    changed = list(changed)
    if not changed:
        return None
    try:
        stack = blocks(model)
    except ConfigError:
        return None
    where = {id(p): i for i, block in enumerate(stack) for p in block.parameters()}
    found = [where.get(id(p)) for p in changed]
    if any(i is None for i in found):
        return None
    return min(found)


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Content hash of named tensors (names, dtypes, shapes, exact bytes, in the order given): keys a cache to the
    weights or the selection it was computed with, so that anything changed since misses it."""
    return tensor_sha256(list(tensors), sort=False)[:32]


def prefix_digest(model: nn.Module, start: int) -> str:
    """Content hash of every weight of ``model`` outside blocks ``start..`` (embeddings, blocks below ``start``)."""
    later = {id(t) for block in blocks(model)[start:] for t in (*block.parameters(), *block.buffers())}
    named = [*model.named_parameters(), *model.named_buffers()]
    return tensor_digest(sorted(((n, t) for n, t in named if id(t) not in later), key=lambda item: item[0]))


def key_of(material: dict) -> str:
    """The cache key of a JSON-able description of everything a cached result depends on."""
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:24]


# --- where captured tensors live ----------------------------------------------------------------------------------
_MEMORY: OrderedDict[str, dict[str, dict[str, torch.Tensor]]] = OrderedDict()
_MEMORY_BYTES: dict[str, int] = {}
_CHECKED: set[str] = set()  # keys whose blocks were seen to return plain tensors (a pass-through can stand in)


def clear_memory() -> None:
    """Drop every cache entry held in this process's memory."""
    _MEMORY.clear()
    _MEMORY_BYTES.clear()
    _CHECKED.clear()


def memory_bytes() -> int:
    """Bytes of cache entries held in this process's memory."""
    return sum(_MEMORY_BYTES.values())


def _size(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class BatchStore:
    """Tensors per evaluation batch (``"<role>/<n>"``) under one cache key.

    An entry stays in this process's memory while all stores' entries together fit ``memory_bytes`` (entries of
    the least recently used other keys are dropped to make room); beyond that it is written to disk, under
    ``folder``, one file per batch written atomically (a reader never sees half an entry; two processes writing
    the same entry keep one copy). Disk entries outlive the process: later fits (sweep trials) read them.

    Args:
        key: the cache key (see ``key_of``).
        folder: where entries beyond the memory budget go (None: they are not kept).
        memory_bytes: the memory budget of all stores of this process together.
    """

    def __init__(self, key: str, folder: Path | None, memory_bytes: int) -> None:
        self.key = key
        self.folder = folder
        self.memory_bytes = int(memory_bytes)

    def _file(self, name: str) -> Path:
        return self.folder / (name.replace("/", "_") + ".safetensors")

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        """The entry of batch ``name``, or None."""
        entries = _MEMORY.get(self.key)
        if entries is not None and name in entries:
            _MEMORY.move_to_end(self.key)
            return entries[name]
        if self.folder is None:
            return None
        return read_entry(self._file(name), {"key": self.key, "batch": name}, what="evaluation cache entry")

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep the entry of batch ``name`` (in memory if the budget allows, else on disk)."""
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        size = _size(tensors)
        old = _MEMORY.get(self.key, {}).get(name)
        if self._reserve(size, _size(old) if old is not None else 0):
            _MEMORY.setdefault(self.key, {})[name] = tensors
            _MEMORY.move_to_end(self.key)
            return
        if self.folder is not None:  # a full or read-only folder costs speed, not the fit (write_entry warns)
            write_entry(self._file(name), tensors, {"key": self.key, "batch": name}, what="evaluation cache entry")

    def _reserve(self, size: int, old: int) -> bool:
        while memory_bytes() - old + size > self.memory_bytes:
            others = [k for k in _MEMORY if k != self.key]
            if not others:
                return False
            _MEMORY_BYTES.pop(others[0], None)
            _MEMORY.pop(others[0])
        _MEMORY_BYTES[self.key] = _MEMORY_BYTES.get(self.key, 0) + size - old
        return True


def _same_batch(entry: dict[str, torch.Tensor], batch: dict) -> bool:
    ids = batch["input_ids"]
    stored = entry.get("input_ids")
    return stored is not None and stored.shape == ids.shape and torch.equal(stored, ids.to("cpu"))


# --- frozen prefix ------------------------------------------------------------------------------------------------
def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class PrefixScorer:
    """Scores batches with the blocks below ``start`` replaced by their captured output (see the module doc).

    Args:
        model: the model under evaluation (Hugging Face interface, blocks located by ``editing.models.architecture``).
        start: the first block the edit may change.
        store: where the hidden states entering block ``start`` are kept.
    """

    def __init__(self, model: nn.Module, start: int, store: BatchStore) -> None:
        self.blocks = blocks(model)
        self.start = start
        self.store = store
        # the blocks return plain tensors: checked on the first batch of a key (a full pass), then known
        self.checked = store.key in _CHECKED

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        entry = self.store.get(batch["position"]) if self.checked else None
        if entry is not None and _same_batch(entry, batch):
            COUNTERS["prefix_reused"] += 1
            with entering_at(self.blocks, self.start, entry["hidden"].to(ids.device)):
                return token_nll(model, ids, mask, labels)
        captured: dict = {}
        with self._capturing(captured):
            out = token_nll(model, ids, mask, labels)
        self.checked = True
        if captured.get("plain"):
            _CHECKED.add(self.store.key)
            self.store.put(batch["position"], {"input_ids": ids, "hidden": captured["hidden"]})
            COUNTERS["prefix_captured"] += 1
        else:
            COUNTERS["full_passes"] += 1
        return out

    @contextmanager
    def _capturing(self, captured: dict) -> Iterator[None]:
        block = self.blocks[self.start]

        def pre(_module, args, kwargs):
            captured["hidden"] = _hidden_in(args, kwargs).detach().clone()

        def post(_module, _args, _kwargs, output):
            # the pass-through returns what the model's loop expects only when blocks return a plain tensor
            captured["plain"] = isinstance(output, torch.Tensor)

        handles = [block.register_forward_pre_hook(pre, with_kwargs=True),
                   block.register_forward_hook(post, with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


# --- sense edits --------------------------------------------------------------------------------------------------
class SenseScorer:
    """Scores batches of a Backpack under a sense edit from p0's cached values (see the module doc).

    Args:
        model: the Backpack LM under evaluation (with the edit installed).
        edit: the selected pairs and their deltas.
        store: where each batch's p0 values are kept.
    """

    def __init__(self, model: nn.Module, edit: SenseEdit, store: BatchStore) -> None:
        self.backpack = backpack_of(model)
        self.edit = edit
        self.store = store
        config = self.backpack.config
        slot = torch.full((config.vocab_size, config.num_senses), -1, dtype=torch.long)
        slot[edit.vocab_ids.cpu(), edit.sense_ids.cpu()] = torch.arange(edit.vocab_ids.numel())
        self.slot = slot

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = self.edit.vectors.detach()
        if not bool(torch.isfinite(vectors).all()):
            # 0 * inf is NaN: a non-finite delta reaches positions alpha gives no weight; measure it in full
            COUNTERS["full_passes"] += 1
            return token_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        entry = self.store.get(batch["position"])
        if entry is None or not _same_batch(entry, batch):
            entry = self._build(model, batch)
            self.store.put(batch["position"], entry)
            COUNTERS["senses_built"] += 1
        else:
            COUNTERS["senses_reused"] += 1
        device = batch["input_ids"].device
        nll, rows = entry["nll"].to(device), entry["rows"].to(device)
        affected = entry["affected"].to(device)
        if affected.numel() == 0 or not bool(vectors.any()):
            return nll, rows  # no position sees a nonzero delta: p0's values are the edited model's, bit for bit
        hidden = entry["hidden"].to(device) + entry["weights"].to(device) @ vectors.to(device, torch.float32)
        nll = nll.clone()
        nll[affected] = head_nll(model, hidden, entry["targets"].to(device))
        return nll, rows

    @torch.no_grad()
    def _build(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        seen: dict = {}
        handle = self.backpack.sense_weight_net.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("alpha", out))
        try:
            with self.edit.reference(), capture_final_hidden(model) as store:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            handle.remove()
        hidden = store["hidden"]
        nll, rows = scored_nll(model, hidden, labels)
        alpha = seen["alpha"].float()  # (b, k, t, j)
        # W[b, s, t] = sum over sources j holding pair s's word of alpha[b, l_s, t, j]: every source, as the full
        # pass sums over every source (alpha is zero above the diagonal and at padding)
        slots = self.slot.to(ids.device)[ids]  # (b, j, k)
        row, source, sense = (slots >= 0).nonzero(as_tuple=True)
        pair = slots[row, source, sense]
        weights = torch.zeros(ids.shape[0], self.edit.vocab_ids.numel(), ids.shape[1], device=ids.device)
        weights.index_put_((row, pair), alpha[row, sense, :, source], accumulate=True)
        scored = labels != IGNORE
        weights = weights.transpose(1, 2)[scored]  # (n, S), scored positions in token_nll's order
        affected = weights.ne(0).any(dim=1).nonzero(as_tuple=True)[0]
        return {"input_ids": ids, "nll": nll, "rows": rows, "affected": affected,
                "hidden": hidden[scored][affected].float(), "weights": weights[affected],
                "targets": labels[scored][affected]}

"""The teacher's side of Backpack distillation, computed once and kept on disk.

In distillation the contextualizer is the frozen teacher, so for every block of the corpus its hidden states (alpha
is computed from them) and its next-token distributions never change. One pass stores them:

* ``hidden``: the contextualizer's last hidden states, (blocks, block_size, d), in bf16 (or fp32);
* ``topk_logp`` / ``topk_ids``: the teacher's ``top_k`` largest next-token log-probabilities (fp32) and their token
  ids, per position;
* ``tail_logp``: the log of the probability mass outside the top k (``-inf`` when the top k are the whole
  vocabulary).

Training then runs only the sense network, alpha and the output projection. The loss is the KL between the teacher
and the student over ``top_k + 1`` outcomes: each of the teacher's top-k tokens, and "any other token". With
``top_k`` equal to the vocabulary size it is the full KL exactly.

The cache lives in one folder per (teacher fingerprint, the corpus's blocks, top_k, hidden precision, contextualizer
layers), in shards of ``shard_blocks`` blocks, each written atomically: an interrupted pass resumes at the first
missing shard, and concurrent writers of one shard keep one copy.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from editing.errors import ConfigError
from editing.files import save_atomically
from editing.paths import cache_dir

CACHE_FORMAT = 2
"""Bumped whenever the layout of a shard changes, so that an old cache is never read as a new one."""


HiddenPrecision = Literal["bf16", "fp32"]
"""How the cache stores the contextualizer's hidden states."""
HIDDEN_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp32": torch.float32}

TAIL_EXACT_BELOW = 1e-2
"""``topk_kl`` computes the student's mass outside the top k as one minus its top-k mass, except where that mass is
below this (and fp32 cancellation would show): there it sums the rest of the vocabulary."""


@dataclass
class TeacherCacheConfig:
    """Distillation from stored teacher outputs (``editing backpack cache-teacher`` fills the cache)."""

    enabled: bool = False
    """Train from the cache instead of running the teacher every step (missing shards are computed first)."""
    top_k: int = 64
    """Teacher log-probabilities kept per position; the rest of the vocabulary is one "other" outcome."""
    hidden_precision: HiddenPrecision = "bf16"
    """Storage of the contextualizer's hidden states: bf16 (half the disk) or fp32 (exact)."""
    teacher_bf16: bool = True
    """Run the teacher under bf16 autocast while filling the cache (log-softmax and top-k stay fp32)."""
    shard_blocks: int = 256
    """Corpus blocks per shard file (the unit of resumption)."""
    batch_size: int = 16
    """Blocks per teacher forward pass while filling the cache."""
    folder: str | None = None
    """Where the cache folders go (default: ``<cache>/teacher_cache``); each cache is a sub-folder named by its key."""

    def __post_init__(self) -> None:
        if self.hidden_precision not in HIDDEN_DTYPES:
            raise ConfigError(f"model.teacher_cache.hidden_precision={self.hidden_precision!r} must be one of "
                              f"{sorted(HIDDEN_DTYPES)}")
        for name in ("top_k", "shard_blocks", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"model.teacher_cache.{name}={getattr(self, name)} must be a positive integer")


def blocks_digest(blocks: torch.Tensor) -> str:
    """A hash of the token blocks (it covers the corpus, the tokenizer, the block size and the token limit)."""
    data = blocks.to(torch.int64).contiguous()
    return hashlib.sha256(data.numpy().tobytes() + str(tuple(data.shape)).encode()).hexdigest()[:16]


class TeacherCache:
    """One teacher cache folder: its manifest, which shards exist, and reads by global block index.

    Args:
        folder: the cache folder (created on ``fill``).
        manifest: what the cache holds: key settings, block count and shard size.
    """

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.shard_blocks = int(manifest["shard_blocks"])
        self.num_blocks = int(manifest["num_blocks"])
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_run(cls, identity: dict, blocks: torch.Tensor, layers: int, config: TeacherCacheConfig) -> TeacherCache:
        """The cache of a teacher (``identity`` from ``load_model``) over ``blocks``, keyed by everything that
        changes its contents."""
        manifest = {"format": CACHE_FORMAT, "teacher": identity.get("name"),
                    "teacher_fingerprint": identity["fingerprint"], "blocks": blocks_digest(blocks),
                    "num_blocks": int(blocks.shape[0]), "block_size": int(blocks.shape[1]), "layers": int(layers),
                    "top_k": int(config.top_k), "hidden_precision": config.hidden_precision,
                    "teacher_bf16": bool(config.teacher_bf16), "shard_blocks": int(config.shard_blocks)}
        key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(config.folder).expanduser() if config.folder else cache_dir() / "teacher_cache"
        folder = root / key
        found = folder / "manifest.json"
        if found.is_file():
            saved = json.loads(found.read_text())
            if saved != manifest:
                raise ConfigError(f"{found} does not describe the cache its folder name promises (settings differ: "
                                  f"{sorted(k for k in manifest if saved.get(k) != manifest[k])}); delete {folder} "
                                  "and fill it again")
        return cls(folder, manifest)

    @property
    def num_shards(self) -> int:
        return -(-self.num_blocks // self.shard_blocks)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.pt"

    def missing_shards(self) -> list[int]:
        """Shards not yet written."""
        return [s for s in range(self.num_shards) if not self.shard_path(s).is_file()]

    def fill(self, compute, blocks: torch.Tensor, batch_size: int, progress: bool = True, rank: int = 0,
             world: int = 1) -> int:
        """Write the missing shards (of this rank's share: shard numbers equal to ``rank`` modulo ``world``).

        Args:
            compute: ``(input_ids) -> dict`` of the per-block tensors (``teacher_outputs``).
            blocks: the corpus's blocks, (num_blocks, block_size), in the order the cache indexes them.
            batch_size: blocks per ``compute`` call.
            progress: print a line per shard (blocks done, tokens/s, time left) to stderr.
            rank: this process's share of the work, with ``world`` processes filling the cache together.
            world: how many processes share the work.

        Returns:
            How many shards were written.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            save_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)),
                            keep_existing=True)
        todo = [s for s in self.missing_shards() if s % world == rank]
        start, written = time.perf_counter(), 0
        for count, shard in enumerate(todo, 1):
            lo, hi = shard * self.shard_blocks, min(self.num_blocks, (shard + 1) * self.shard_blocks)
            parts = [compute(blocks[i: min(hi, i + batch_size)]) for i in range(lo, hi, batch_size)]
            tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            save_atomically(self.shard_path(shard), lambda tmp, t=tensors: torch.save(t, tmp), keep_existing=True)
            written += hi - lo
            if progress:
                seconds = time.perf_counter() - start
                rate = written * blocks.shape[1] / max(seconds, 1e-9)
                left = sum(min(self.num_blocks, (s + 1) * self.shard_blocks) - s * self.shard_blocks
                           for s in todo[count:]) * blocks.shape[1] / max(rate, 1e-9)
                print(f"teacher cache: shard {shard + 1}/{self.num_shards} ({hi} of {self.num_blocks} blocks), "
                      f"{rate:.0f} tokens/s, about {left / 60:.1f} min left", file=sys.stderr, flush=True)
        return len(todo)

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise ConfigError(f"teacher cache shard {path} is missing; run `editing backpack cache-teacher` with "
                                  "the same settings (or distil with --model.teacher_cache.enabled true, which fills "
                                  "it)")
            self._shards[shard] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return self._shards[shard]

    def read(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The cached tensors of the blocks at global ``indices``, stacked in that order."""
        rows = [self._shard(int(i) // self.shard_blocks) for i in indices.tolist()]
        local = [int(i) % self.shard_blocks for i in indices.tolist()]
        return {key: torch.stack([row[key][j] for row, j in zip(rows, local, strict=True)]) for key in rows[0]}


@torch.no_grad()
def teacher_outputs(teacher_pass, head, input_ids: torch.Tensor, top_k: int,
                    hidden_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What the cache stores for a batch of blocks.

    Args:
        teacher_pass: ``(input_ids) -> (contextual, final)``: the contextualizer's last hidden states and the
            teacher's hidden states before its head, each (b, s, d) (the same tensor when the contextualizer is the
            whole teacher).
        head: the teacher's output projection.
        input_ids: (b, s) token blocks.
        top_k: log-probabilities kept per position (at most the vocabulary size).
        hidden_dtype: storage dtype of the hidden states.

    Returns:
        On the CPU: ``hidden`` (b, s, d), ``topk_logp`` (b, s, k) fp32, ``topk_ids`` (b, s, k) int32, ``tail_logp``
        (b, s) fp32.
    """
    contextual, final = teacher_pass(input_ids)
    logp = F.log_softmax(head(final).float(), dim=-1)
    k = min(top_k, logp.shape[-1])
    values, ids = logp.topk(k, dim=-1)
    # the mass outside the top k as one minus the top-k mass (no second pass over the vocabulary), summed
    # exactly where that difference would cancel (as topk_kl does for the student)
    top = torch.logsumexp(values, dim=-1)
    exact = -top < TAIL_EXACT_BELOW
    tail = torch.log(-torch.expm1(top.clamp(max=-TAIL_EXACT_BELOW)))
    if bool(exact.any()):
        tail[exact] = torch.logsumexp(logp[exact].scatter(-1, ids[exact], float("-inf")), dim=-1)
    out = {"hidden": contextual.to(hidden_dtype), "topk_logp": values.float(), "topk_ids": ids.to(torch.int32),
           "tail_logp": tail.float()}
    return {key: value.cpu() for key, value in out.items()}


def topk_kl(s_logp: torch.Tensor, topk_ids: torch.Tensor, topk_logp: torch.Tensor,
            tail_logp: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over the teacher's top-k tokens plus one "any other token" outcome.

    Args:
        s_logp: (n, vocab) the student's next-token log-probabilities (fp32).
        topk_ids: (n, k) the teacher's top-k token ids.
        topk_logp: (n, k) the teacher's log-probabilities of them.
        tail_logp: (n,) the log of the teacher's remaining mass (``-inf``: none remains).

    Returns:
        The KL summed over the n positions (a scalar).
    """
    ids = topk_ids.long()
    return topk_kl_of(s_logp.gather(-1, ids), topk_logp, tail_logp,
                      lambda rows: torch.logsumexp(s_logp[rows].scatter(-1, ids[rows], float("-inf")), dim=-1))


def topk_kl_of(s_top: torch.Tensor, topk_logp: torch.Tensor, tail_logp: torch.Tensor, rest_of) -> torch.Tensor:
    """``topk_kl`` from the student's log-probabilities of the teacher's top k alone.

    Args:
        s_top: (n, k) the student's log-probabilities of the teacher's top-k tokens (fp32).
        topk_logp: (n, k) the teacher's log-probabilities of them.
        tail_logp: (n,) the log of the teacher's remaining mass (``-inf``: none remains).
        rest_of: ``(rows) -> (len(rows),)``: the student's exact log-mass outside the top k at the positions
            ``rows`` (int64 indices), summed over the rest of the vocabulary; called only where one minus the
            top-k mass would cancel.

    Returns:
        The KL summed over the n positions (a scalar).
    """
    kl = (topk_logp.exp() * (topk_logp - s_top)).sum()
    rows = torch.isfinite(tail_logp)
    if bool(rows.any()):
        # Only rows with mass outside the top k: a logsumexp over nothing has a NaN gradient, even times zero.
        # The student's mass outside the top k is one minus its mass on them, so the k log-probabilities give it
        # without a second pass over the vocabulary (that pass, forward and backward, cost as much as the rest of
        # the cached step). Where the student's top-k mass is within TAIL_EXACT_BELOW of one, that difference
        # cancels in fp32, so those rows take the exact sum over the rest of the vocabulary instead.
        top = torch.logsumexp(s_top[rows], dim=-1)
        exact = -top < TAIL_EXACT_BELOW
        s_tail = torch.log(-torch.expm1(torch.where(exact, torch.full_like(top, -1.0), top)))
        if bool(exact.any()):
            s_tail = s_tail.masked_scatter(exact, rest_of(rows.nonzero().squeeze(-1)[exact]))
        kl = kl + (tail_logp[rows].exp() * (tail_logp[rows] - s_tail)).sum()
    return kl


def describe(cache: TeacherCache) -> str:
    """One line about a cache: where it is, how full, its size on disk."""
    done = cache.num_shards - len(cache.missing_shards())
    size = sum(p.stat().st_size for p in cache.folder.glob("shard-*.pt")) if cache.folder.is_dir() else 0
    return (f"teacher cache {cache.folder}: {done}/{cache.num_shards} shards, {cache.num_blocks} blocks of "
            f"{cache.manifest['block_size']} tokens, top_k {cache.manifest['top_k']}, {size / 2**20:.0f} MiB")



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

The cache lives in one folder per key (its manifest), in shards of ``shard_blocks`` blocks, each a checked cache entry
(``editing.caches.entries``) written atomically: an interrupted pass resumes at the first missing shard, and concurrent
writers of one shard keep one copy.

Key covers (the manifest): the teacher's weights (its content fingerprint) and name, the token blocks' bytes (which
cover the corpus, the tokenizer's content, the block size and the token limit), the block count and size, the
contextualizer layers, top_k, the hidden states' storage precision, the teacher's bf16 autocast, the shard size, the
device type the teacher runs on, the code digest of this module and of the distillation module (the teacher pass,
``teacher_outputs``) with the teacher's own package classes, and the torch/transformers/python versions.
Why that is enough: a shard is ``teacher_outputs`` of the teacher's forward pass (weights, dtype, autocast, device,
kernels, code) on its blocks, and nothing else.

Each shard's metadata holds its material (the cache's key and the shard's number and block range) and the content
hash of its tensors. Before filling, every shard's header is checked (cheap: it is not read): one that is truncated,
of the old format, or another cache's or another shard's (files swapped) is computed again. When a shard is first
read, its content hash, shapes and NaN are checked; a shard that fails is computed again when the cache has its
teacher (after ``fill``), else refused naming the file and the fix. A cache folder that cannot be written keeps the
shards in memory, with a warning: it costs speed (and memory), never the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from editing.caches.entries import ENTRY_FORMAT, canonical_json, write_entry
from editing.core.digests import code_digest, library_versions, tensor_sha256
from editing.core.errors import ConfigError
from editing.core.files import save_atomically
from editing.core.paths import cache_dir

log = logging.getLogger(__name__)

CACHE_FORMAT = 3
"""Bumped whenever the layout of a shard changes, so that an old cache is never read as a new one (3: shards are
checked safetensors entries)."""

CACHE_CODE = ("editing.models.backpack.teacher_cache", "editing.models.backpack.distill")
"""The code that computes a shard: ``teacher_outputs`` here and the teacher pass of the distillation module."""

SHARD_KEYS = ("hidden", "topk_logp", "topk_ids", "tail_logp")
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                       "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


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
        self._unwritten: dict[int, dict[str, torch.Tensor]] = {}
        """Shards computed but not on disk (the folder cannot be written): kept for this process."""
        self._compute = None
        self._blocks: torch.Tensor | None = None
        self._batch_size = 1

    @property
    def key(self) -> str:
        """The cache's key: its folder's name (the hash of its manifest)."""
        return self.folder.name

    def shard_material(self, shard: int) -> dict:
        """What shard ``shard`` holds: this cache's blocks ``lo`` to ``hi`` (checked when it is read)."""
        lo, hi = self.shard_range(shard)
        return {"kind": "teacher cache shard", "cache": self.key, "shard": shard, "blocks": [lo, hi]}

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The global block indices ``[lo, hi)`` of a shard."""
        return shard * self.shard_blocks, min(self.num_blocks, (shard + 1) * self.shard_blocks)

    @classmethod
    def for_run(cls, identity: dict, blocks: torch.Tensor, layers: int, config: TeacherCacheConfig,
                device: str = "cpu", code_modules: tuple[str, ...] = ()) -> TeacherCache:
        """The cache of a teacher (``identity`` from ``load_model``) over ``blocks``, keyed by everything that
        changes its contents (see the module docstring).

        Args:
            identity: the teacher's identity (name, content fingerprint).
            blocks: the corpus's token blocks.
            layers: the contextualizer's layers.
            config: the cache settings.
            device: the device type the teacher runs on.
            code_modules: further package modules whose code runs in the teacher pass (the teacher's classes).
        """
        manifest = {"format": CACHE_FORMAT, "teacher": identity.get("name"),
                    "teacher_fingerprint": identity["fingerprint"], "blocks": blocks_digest(blocks),
                    "num_blocks": int(blocks.shape[0]), "block_size": int(blocks.shape[1]), "layers": int(layers),
                    "top_k": int(config.top_k), "hidden_precision": config.hidden_precision,
                    "teacher_bf16": bool(config.teacher_bf16), "shard_blocks": int(config.shard_blocks),
                    "device": str(device), "code": code_digest(*CACHE_CODE, *code_modules),
                    "libraries": library_versions()}
        key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(config.folder).expanduser() if config.folder else cache_dir() / "teacher_cache"
        folder = root / key
        found = folder / "manifest.json"
        if found.is_file():
            try:
                saved = json.loads(found.read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(f"{found} cannot be read ({err}); delete {folder} and fill it again "
                                  "(`editing backpack cache-teacher`)") from None
            if saved != manifest:
                keys = sorted(k for k in manifest if not isinstance(saved, dict) or saved.get(k) != manifest[k])
                raise ConfigError(f"{found} does not describe the cache its folder name promises (settings differ: "
                                  f"{keys}); delete {folder} and fill it again")
        return cls(folder, manifest)

    @property
    def num_shards(self) -> int:
        return -(-self.num_blocks // self.shard_blocks)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def missing_shards(self) -> list[int]:
        """Shards not yet written (nor held in memory)."""
        return [s for s in range(self.num_shards) if s not in self._unwritten and not self.shard_path(s).is_file()]

    def _header_problem(self, shard: int) -> str | None:
        """Why a shard's file cannot be this shard, from its header alone (None: it may be; its content is checked
        when it is read)."""
        try:
            header, size, end = _read_header(self.shard_path(shard))
        except (OSError, ValueError) as err:
            return f"has an unreadable header ({err})"
        meta = header.get("__metadata__") or {}
        if meta.get("format") != ENTRY_FORMAT or "content" not in meta:
            return "was written by an older version (no content hash)"
        if meta.get("material") != canonical_json(self.shard_material(shard)):
            return "holds another shard or another cache's data (files moved or swapped?)"
        if size != end:
            return f"is truncated or padded ({size} bytes, its header describes {end})"
        return None

    def damaged_shards(self) -> list[int]:
        """Shards on disk whose header shows they are not this cache's shard (each named in a warning)."""
        bad = []
        for shard in range(self.num_shards):
            if shard in self._unwritten or not self.shard_path(shard).is_file():
                continue
            problem = self._header_problem(shard)
            if problem:
                log.warning("teacher cache shard %s %s; computing it again", self.shard_path(shard), problem)
                bad.append(shard)
        return bad

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
        self._compute, self._blocks, self._batch_size = compute, blocks, batch_size
        self._write_manifest()
        todo = sorted(set(self.missing_shards()) | set(self.damaged_shards()))
        todo = [s for s in todo if s % world == rank]
        start, written = time.perf_counter(), 0
        for count, shard in enumerate(todo, 1):
            lo, hi = self.shard_range(shard)
            self._compute_shard(shard)
            written += hi - lo
            if progress:
                seconds = time.perf_counter() - start
                rate = written * blocks.shape[1] / max(seconds, 1e-9)
                left = sum(self.shard_range(s)[1] - self.shard_range(s)[0]
                           for s in todo[count:]) * blocks.shape[1] / max(rate, 1e-9)
                print(f"teacher cache: shard {shard + 1}/{self.num_shards} ({hi} of {self.num_blocks} blocks), "
                      f"{rate:.0f} tokens/s, about {left / 60:.1f} min left", file=sys.stderr, flush=True)
        return len(todo)

    def _write_manifest(self) -> None:
        manifest = self.folder / "manifest.json"
        try:
            if not manifest.is_file():
                save_atomically(manifest, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)),
                                keep_existing=True)
        except OSError as err:
            log.warning("could not write the teacher cache %s (%s); its shards are kept in memory for this run",
                        self.folder, err)

    def _compute_shard(self, shard: int) -> dict[str, torch.Tensor]:
        """Compute one shard with the teacher given to ``fill``, store it (in memory if the folder cannot be
        written) and return it."""
        lo, hi = self.shard_range(shard)
        step = self._batch_size
        parts = [self._compute(self._blocks[i: min(hi, i + step)]) for i in range(lo, hi, step)]
        tensors = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        if write_entry(self.shard_path(shard), tensors, self.shard_material(shard), what="teacher cache shard"):
            self._unwritten.pop(shard, None)
        else:
            self._unwritten[shard] = tensors
        self._shards.pop(shard, None)
        return tensors

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if shard in self._unwritten:
            return self._unwritten[shard]
        if shard not in self._shards:
            path = self.shard_path(shard)
            fix = ("run `editing backpack cache-teacher` with the same settings (or distil with "
                   "--model.teacher_cache.enabled true, which fills it)")
            if not path.is_file():
                raise ConfigError(f"teacher cache shard {path} is missing; {fix}")
            problem = self._header_problem(shard)
            tensors = None
            if problem is None:
                try:
                    tensors, meta = _map_safetensors(path)
                except (OSError, ValueError) as err:
                    problem = f"cannot be read ({err})"
                else:
                    problem = self._content_problem(shard, tensors, meta)
            if problem:
                if self._compute is None:
                    raise ConfigError(f"teacher cache shard {path} {problem}; delete it and {fix}: the missing shard "
                                      "is computed again")
                log.warning("teacher cache shard %s %s; computing it again", path, problem)
                return self._compute_shard(shard)
            self._shards[shard] = tensors
        return self._shards[shard]

    def _content_problem(self, shard: int, tensors: dict[str, torch.Tensor], meta: dict) -> str | None:
        if tensor_sha256(tensors) != meta.get("content"):
            return "does not match its content hash (damaged or changed since it was written)"
        if set(tensors) != set(SHARD_KEYS):
            return f"holds {sorted(tensors)}, expected {sorted(SHARD_KEYS)}"
        lo, hi = self.shard_range(shard)
        lead = (hi - lo, int(self.manifest["block_size"]))
        wrong = [k for k, t in tensors.items() if tuple(t.shape[:2]) != lead]
        if wrong:
            return f"has the wrong shape for {wrong[0]} ({tuple(tensors[wrong[0]].shape)}, expected {lead} first)"
        nan = [k for k, t in tensors.items() if t.is_floating_point() and bool(torch.isnan(t).any())]
        if nan:
            return f"holds NaN ({nan[0]})"
        return None

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
    size = sum(p.stat().st_size for p in cache.folder.glob("shard-*.safetensors")) if cache.folder.is_dir() else 0
    return (f"teacher cache {cache.folder}: {done}/{cache.num_shards} shards, {cache.num_blocks} blocks of "
            f"{cache.manifest['block_size']} tokens, top_k {cache.manifest['top_k']}, {size / 2**20:.0f} MiB")




def _read_header(path: Path) -> tuple[dict, int, int]:
    """A safetensors file's header, its size, and the size its header describes (8 bytes, header, data)."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a header")
        (length,) = struct.unpack("<Q", raw)
        size = os.fstat(handle.fileno()).st_size
        if length > min(size, 100 << 20):
            raise ValueError("header length beyond the file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    return header, size, 8 + length + end


def _map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a safetensors file mapped from disk (not copied into memory: a cache of many gigabytes is
    paged in as it is read), and its metadata. The map is private (copy on write), so the tensors are writable."""
    header, size, end = _read_header(path)
    if size != end:
        raise ValueError(f"{size} bytes, its header describes {end}")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    start = size - max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    # (the data follow the header directly, so they start where the data's length ends the file)
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"unsupported dtype {info['dtype']}")
        lo, hi = (int(v) for v in info["data_offsets"])
        count = (hi - lo) // torch.empty((), dtype=dtype).element_size()
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + lo) if count else torch.empty(
            0, dtype=dtype)
        tensors[name] = flat.view(tuple(info["shape"]))
    return tensors, dict(header.get("__metadata__") or {})

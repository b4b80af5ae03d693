"""Alpha-importance selection of the sense vectors to finetune (SPEC section 8), and its cached background.

For a word type w and sense l, an example's score sums alpha[l, t, j] over the target positions t that predict a
suffix token and the source positions j that hold w: how much sense l of w carries the prediction of the suffix.
The background is the same sum on the general set R with every position a target, averaged over R's texts. The
background depends only on (model, R), so it is computed once and cached on disk; a sweep over lambda and k reuses
it.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from editing.caches.entries import canonical_json, expect_shapes, read_entry, write_entry
from editing.caches.keys import computation_material
from editing.core.errors import ConfigError
from editing.core.paths import cache_dir
from editing.core.types import LossType
from editing.data.batching import IGNORE, collate
from editing.data.tokenize import TokenizedExample

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The selected (vocab id, sense index) pairs with their importance."""

    vocab_ids: torch.Tensor
    sense_ids: torch.Tensor
    importance: torch.Tensor
    requested: int
    capped_examples: int

    def __len__(self) -> int:
        return int(self.vocab_ids.numel())


def _alpha_mass(model, batch: dict, targets: torch.Tensor) -> torch.Tensor:
    """(sequences, senses, length) alpha summed over the target positions ``targets`` (sequences, length)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_alpha=True)
    alpha = out.alpha.float()  # (b, k, t, j)
    return torch.einsum("bktj,bt->bkj", alpha, targets.to(alpha.dtype))


@torch.no_grad()
def background_usage(model, texts: list[TokenizedExample], vocab_size: int, num_senses: int, pad_id: int,
                     batch_texts: int = 8, progress: bool = True) -> torch.Tensor:
    """Average over texts of each (word, sense)'s alpha mass with every position a target: (vocab, senses)."""
    device = next(model.parameters()).device
    total = torch.zeros(vocab_size * num_senses, dtype=torch.float64, device=device)
    steps = range(0, len(texts), batch_texts)
    for start in tqdm(steps, desc="sense background (R)", disable=not progress, file=sys.stderr):
        batch = collate(texts[start: start + batch_texts], role="regularization", pad_id=pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mask = batch["attention_mask"]
        mass = _alpha_mass(model, batch, mask)  # (b, k, j)
        k = mass.shape[1]
        keys = batch["input_ids"][:, None, :] * num_senses + torch.arange(k, device=device)[None, :, None]
        real = mask[:, None, :].expand_as(mass).bool()
        total.index_add_(0, keys.expand_as(mass)[real], mass[real].double())
    return (total / max(1, len(texts))).view(vocab_size, num_senses).float().cpu()


BACKGROUND_CODE = ("editing.methods.senses.selection",)
"""The code that computes a background (``background_usage`` and what it imports); the model's own package code is
added from the model (``editing.caches.keys.model_code_modules``)."""


def _texts_digest(texts: list[TokenizedExample]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        for seq in text.sequences:
            digest.update(torch.tensor(seq.ids, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
        digest.update(b"#")
    return digest.hexdigest()


def background_material(model, fingerprint: str, texts: list[TokenizedExample], vocab_size: int, num_senses: int,
                        pad_id: int, batch_texts: int) -> dict:
    """Everything a background depends on (its cache key).

    Key covers: the weights (``fingerprint``, a content hash of the fp32 weights), the dtype and device the model
    runs in now (read from its parameters) with the matmul precision and autocast state, R's token ids text by text
    (which covers R's file, the tokenizer and ``max_length``), the vocabulary and sense counts, the padding id and
    ``batch_texts`` (padding and batch shapes change the last bits of a sum), the code digest of this module's import
    closure and of the model's package classes, and the torch/transformers/python versions.
    Why that is enough: ``background_usage`` is a function of exactly these: the model's forward pass (weights,
    dtype, device, kernels, code) on the batches built from R's ids.
    """
    return {"kind": "sense background", "fingerprint": fingerprint,
            **computation_material(model, *BACKGROUND_CODE), "texts": _texts_digest(texts), "count": len(texts),
            "vocab_size": int(vocab_size), "num_senses": int(num_senses), "pad_id": int(pad_id),
            "batch_texts": int(batch_texts)}


def background_cache_path(material: dict) -> Path:
    """Where the background of ``material`` (``background_material``) is cached."""
    key = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]
    name = f"{material['vocab_size']}x{material['num_senses']}_{material['count']}texts_{key}.safetensors"
    return cache_dir() / "sense_background" / str(material["fingerprint"]).replace(":", "-") / name


def cached_background(model, fingerprint: str, texts: list[TokenizedExample], vocab_size: int, num_senses: int,
                      pad_id: int, batch_texts: int = 8, progress: bool = True) -> torch.Tensor:
    """``background_usage``, read from the cache when the same computation was made before, else computed and
    cached (see ``background_material`` for the key). An entry that is damaged, changed since it was written, of
    another shape or holding NaN is recomputed with a warning naming it; a cache folder that cannot be written costs
    the cache only."""
    material = background_material(model, fingerprint, texts, vocab_size, num_senses, pad_id, batch_texts)
    path = background_cache_path(material)
    shape = expect_shapes({"background": (vocab_size, num_senses)})

    def valid(tensors: dict[str, torch.Tensor]) -> str | None:
        return shape(tensors) or (None if _finite(tensors["background"]) else "holds NaN or infinite values")

    found = read_entry(path, material, what="sense background", check=valid)
    if found is not None:
        log.info("sense background: reusing %s", path)
        return found["background"]
    usage = background_usage(model, texts, vocab_size, num_senses, pad_id, batch_texts, progress)
    if _finite(usage):  # a NaN background is returned (the selection reports it), never kept
        write_entry(path, {"background": usage}, material, what="sense background")
    return usage


def _finite(background: torch.Tensor) -> bool:
    # numpy on the CPU copy: no torch operation on the CPU while the model may be on a device
    return bool(np.isfinite(background.numpy()).all())


def slot_signs(loss: LossType | str, n_slots: int) -> list[float]:
    """How each suffix's score enters the importance (SPEC section 8): good-v-bad scores suffix1 - suffix2, balance
    suffix1 + suffix2; single-suffix losses have one slot."""
    loss = LossType(loss)
    if n_slots != (2 if loss.pair else 1):
        raise ConfigError(f"loss {loss.value!r} expects {2 if loss.pair else 1} suffix(es) per example, got {n_slots}")
    if loss is LossType.GOOD_V_BAD:
        return [1.0, -1.0]
    return [1.0] * n_slots


@torch.no_grad()
def example_importance(model, examples: list[TokenizedExample], loss: LossType | str, background: torch.Tensor,
                       selection_lambda: float, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per example: candidate pair keys (vocab id x senses + sense) with score > 0, and their importance (on the
    model's device)."""
    loss = LossType(loss)
    device = next(model.parameters()).device
    num_senses = background.shape[1]
    bg = background.reshape(-1).to(device)
    results = []
    for example in examples:
        batch = collate([example], role="canonical", pad_id=pad_id)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        mass = _alpha_mass(model, batch, batch["labels"] != IGNORE)  # (slots, k, j)
        signs = torch.tensor(slot_signs(loss, mass.shape[0]), device=device)[batch["seq_slot"]]
        keys = batch["input_ids"][:, None, :] * num_senses + torch.arange(num_senses, device=device)[None, :, None]
        real = batch["attention_mask"][:, None, :].expand_as(mass).bool()
        flat_keys = keys.expand_as(mass)[real]
        flat_mass = (mass * signs[:, None, None])[real]
        unique, inverse = torch.unique(flat_keys, return_inverse=True)
        score = torch.zeros(unique.numel(), dtype=torch.float64, device=device).index_add_(0, inverse,
                                                                                          flat_mass.double())
        keep = score > 0
        importance = score[keep] - selection_lambda * bg[unique[keep]].double()
        results.append((unique[keep], importance))  # on the model's device: the selection ranks them there
    return results


def select_senses(per_example: list[tuple[torch.Tensor, torch.Tensor]], num_senses: int, per_example_k: int,
                  mode: str = "per_example", total: int | None = None) -> Selection:
    """Choose the pairs to finetune from each example's candidates.

    Args:
        per_example: ``example_importance`` output.
        num_senses: senses per word (to split keys into vocab id and sense index).
        per_example_k: top-k pairs per example (``per_example`` mode).
        mode: ``per_example`` (union of each example's top-k) or ``overall`` (top ``total`` pairs by their best
            importance over examples).
        total: pairs kept in ``overall`` mode (default ``per_example_k`` x examples).

    Returns:
        The selection; examples with fewer than k candidates keep all of theirs (counted in ``capped_examples``).
    """
    if per_example_k < 1:
        raise ConfigError(f"senses.senses_per_example={per_example_k} must be at least 1")
    best: dict[int, float] = {}
    capped = 0
    for keys, importance in per_example:
        if mode == "per_example":
            if keys.numel() < per_example_k:
                capped += 1
            order = importance.argsort(descending=True)[:per_example_k]
        else:
            order = torch.arange(keys.numel(), device=keys.device)
        for key, value in zip(keys[order].tolist(), importance[order].tolist(), strict=True):
            best[key] = max(value, best.get(key, float("-inf")))
    if mode == "overall":
        limit = total if total is not None else per_example_k * len(per_example)
        if limit > len(best):
            capped = 1
        best = dict(sorted(best.items(), key=lambda kv: -kv[1])[:limit])
    elif mode != "per_example":
        raise ConfigError(f"senses.selection={mode!r}; expected 'per_example' or 'overall'")
    if not best:
        raise ConfigError("sense selection found no (word, sense) pair with positive score: the canonical examples "
                          "have no scored suffix tokens")
    keys = torch.tensor(sorted(best), dtype=torch.long)
    return Selection(vocab_ids=keys // num_senses, sense_ids=keys % num_senses,
                     importance=torch.tensor([best[k] for k in keys.tolist()], dtype=torch.float32),
                     requested=per_example_k if mode == "per_example" else (total or per_example_k * len(per_example)),
                     capped_examples=capped)

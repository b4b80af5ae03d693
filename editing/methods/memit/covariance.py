"""Covariance statistics C = E[k k^T] of the MLP down-projection inputs over the general set R (SPEC section 10).

They depend only on the model, the layer and the tokens fed, so they are computed once and cached on disk under
``<cache>/memit_stats/<model fingerprint>/``. Each batch's sum of k k^T is taken in float32 and the running sum over
batches of R in float64; the partial sums are saved every few batches so that an interrupted computation resumes
where it stopped.

Every file is a checked cache entry (``editing.caches.entries``): its material and content hash are verified when it is
read, so an entry that is damaged, changed, of other settings or holding NaN is a miss (recomputed, with a warning
naming the file), and a full or read-only cache folder costs the cache, never the run.

Key covers (``stats_material``): the weights (the content fingerprint), the layer, the token ids of every text the
computation reads, in order (which covers R's file, the tokenizer and any override of it, and ``max_length``'s
truncation), the sample count, the batch size and padding id (batch shapes change the last bits of a float sum), the
dtype and device of the computation (read from the model, with the matmul precision and autocast), the code digest of
this module's import closure and of the model's package classes, and the torch/transformers/python versions; R's
file hash, the precision name and the tokenizer's name are kept too, for people reading an entry.
Why that is enough: the statistics are a function of the model's forward pass up to the layer (weights, dtype,
device, kernels, code) on the batches built from exactly those ids; nothing else enters ``layer_covariances``.
A partial sum has the same material plus ``partial``, and its progress (tokens, next text) is stored in its tensors,
so the content hash covers it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from editing.caches.entries import canonical_json, read_entry, write_entry
from editing.caches.keys import computation_material
from editing.core.errors import ConfigError
from editing.core.paths import cache_dir
from editing.data.batching import collate
from editing.data.tokenize import TokenizedExample
from editing.methods.memit.layers import forward_until

log = logging.getLogger(__name__)

SAVE_EVERY = 8  # batches between saves of the partial sums


@dataclass
class CovarianceStats:
    """Second moments per layer, and whether this call computed them or found them cached."""

    moments: dict[int, torch.Tensor]
    """layer -> E[k k^T] (float64, d_mlp x d_mlp), on the model's device."""
    computed_layers: list[int]
    """Layers computed (in full or resumed) by this call; the others came from the cache."""
    seconds: float = 0.0
    """Time spent computing (0 when everything was cached)."""
    materials: dict[int, dict] = field(default_factory=dict)
    """layer -> the statistics' cache key (``stats_material``), for the caches of numbers derived from them
    (AlphaEdit's null-space projector)."""


STATS_CODE = ("editing.methods.memit.covariance",)
"""The code that computes the statistics (this module, ``forward_until`` and what they import)."""


def tokens_digest(texts: list[TokenizedExample], samples: int) -> str:
    """SHA-256 of the token ids the statistics read: every sequence of the texts up to the one holding the
    ``samples``-th token (the rest of R is never read)."""
    digest, seen = hashlib.sha256(), 0
    for text in texts:
        if seen >= samples:
            break
        for seq in text.sequences:
            digest.update(torch.tensor(seq.ids, dtype=torch.int64).numpy().tobytes())
            digest.update(b"|")
        digest.update(b"#")
        seen += len(text.sequences[0].ids)
    return digest.hexdigest()


def stats_material(model: nn.Module, layer: int, texts: list[TokenizedExample], *, fingerprint: str,
                   corpus_sha: str, samples: int, precision: str, batch_size: int, pad_id: int,
                   tokenizer: str | None = None, max_length: int | None = None,
                   computation: dict | None = None, tokens: str | None = None) -> dict:
    """What one layer's statistics depend on (their cache key; see the module docstring). ``computation`` and
    ``tokens`` (``computation_material``, ``tokens_digest``) may be given when several layers share them."""
    return {"kind": "memit statistics", "fingerprint": fingerprint, "layer": int(layer),
            **(computation or computation_material(model, *STATS_CODE)),
            "tokens": tokens or tokens_digest(texts, samples),
            "samples": int(samples), "batch_size": int(batch_size), "pad_id": int(pad_id), "corpus": corpus_sha,
            "precision": precision, "tokenizer": tokenizer, "max_length": max_length}


def stats_path(material: dict) -> Path:
    """Cache file of one layer's statistics of ``material`` (``stats_material``)."""
    key = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]
    return (cache_dir() / "memit_stats" / str(material["fingerprint"]).replace(":", "-")
            / f"layer{material['layer']}_{material['samples']}_{material['precision']}_{key}.safetensors")


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".partial.safetensors"))


def _square(name: str):
    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        t = tensors.get(name)
        if t is None or t.ndim != 2 or t.shape[0] != t.shape[1] or t.dtype != torch.float64:
            return f"does not hold a square float64 {name!r}"
        return None

    return check


def _on_device_if_finite(tensor: torch.Tensor, device: torch.device, path: Path, what: str) -> torch.Tensor | None:
    """``tensor`` moved to ``device``, or None (with a warning naming ``path``) when it holds NaN or infinities:
    NaN statistics are never reused. Checked on the device, where the solve runs, not on the CPU."""
    moved = tensor.to(device)
    if not bool(torch.isfinite(moved).all()):
        log.warning("%s %s holds NaN or infinite values; computing it again", what, path)
        return None
    return moved


def _read_stats(path: Path, material: dict, device: torch.device) -> torch.Tensor | None:
    found = read_entry(path, material, what="MEMIT statistics", check=_square("moment"))
    return None if found is None else _on_device_if_finite(found["moment"], device, path, "MEMIT statistics")


def _read_partial(path: Path, material: dict, device: torch.device) -> tuple[torch.Tensor, int, int] | None:
    found = read_entry(path, {**material, "partial": True}, what="MEMIT partial statistics", check=_square("sum"))
    if found is None or "progress" not in found or found["progress"].numel() != 2:
        return None
    total = _on_device_if_finite(found["sum"], device, path, "MEMIT partial statistics")
    if total is None:
        return None
    tokens, next_text = (int(v) for v in found["progress"].tolist())
    return total, tokens, next_text


def layer_covariances(model: nn.Module, layers: list[int], texts: list[TokenizedExample], *, fingerprint: str,
                      corpus_sha: str, samples: int, precision: str, batch_size: int = 16, pad_id: int = 0,
                      progress: bool = True, tokenizer: str | None = None,
                      max_length: int | None = None) -> CovarianceStats:
    """E[k k^T] of each layer's down-projection input over the first ``samples`` tokens of ``texts``.

    Long because the cache read, the resume from partial sums, the one pass over R that accumulates every missing
    layer's sum (saving partial sums every ``SAVE_EVERY`` batches) and the final write share the layers' cache
    materials and paths and the pass's running state (sums, tokens done, next text). Split into pieces, that state
    would travel between them, and a slip would change the cache keys or the float32-products/float64-sum order the
    cached statistics were computed with; the steps are marked by comments instead.

    Args:
        model: the unedited model (p0).
        layers: layers whose statistics are wanted.
        texts: the tokenized general set R, in file order.
        fingerprint: the base model's weight fingerprint (part of the cache key).
        corpus_sha: SHA-256 of R's file (part of the cache key).
        samples: number of tokens to average over (every real token of the texts, in order, counts).
        precision: the model's precision name (keys differ slightly between fp32 and bf16).
        batch_size: texts per forward pass.
        pad_id: padding token id.
        progress: show a progress bar.
        tokenizer: the tokenizer's name (recorded in the key for readers; its content is in the token ids).
        max_length: the truncation length R was tokenized with (recorded likewise).

    Returns:
        The statistics, with which layers were computed now.
    """
    import time

    available = sum(len(t.sequences[0].ids) for t in texts)
    if samples > available:
        raise ConfigError(f"memit.covariance_samples={samples} exceeds the {available} tokens of the general set R; "
                          f"lower it to at most {available}")
    shared = {"computation": computation_material(model, *STATS_CODE), "tokens": tokens_digest(texts, samples)}
    materials = {layer: stats_material(model, layer, texts, fingerprint=fingerprint, corpus_sha=corpus_sha,
                                       samples=samples, precision=precision, batch_size=batch_size, pad_id=pad_id,
                                       tokenizer=tokenizer, max_length=max_length, **shared) for layer in layers}
    paths = {layer: stats_path(material) for layer, material in materials.items()}
    # the solve that reads them runs on the model's device: files are read there, sums kept there
    device = next(model.parameters()).device
    moments: dict[int, torch.Tensor] = {}
    for layer, path in paths.items():
        moment = _read_stats(path, materials[layer], device)
        if moment is not None:
            moments[layer] = moment
    missing = [layer for layer in layers if layer not in moments]
    if not missing:
        return CovarianceStats(moments, [], 0.0, materials)

    # Resume from the partial sums of the missing layers when they all stopped at the same place; otherwise
    # start these layers over (they are computed in one pass, so they normally share their progress).
    sums: dict[int, torch.Tensor] = {}
    done_tokens, start_text = 0, 0
    partials = {layer: _partial_path(paths[layer]) for layer in missing}
    if all(p.is_file() for p in partials.values()):
        loaded = {layer: _read_partial(p, materials[layer], device) for layer, p in partials.items()}
        positions = {found[1:] for found in loaded.values() if found is not None}
        if None not in loaded.values() and len(positions) == 1:
            done_tokens, start_text = positions.pop()
            sums = {layer: found[0] for layer, found in loaded.items()}
            log.info("resuming MEMIT statistics at %d of %d tokens", done_tokens, samples)
    start = time.perf_counter()
    bar = tqdm(total=samples, initial=done_tokens, desc=f"MEMIT statistics, layers {missing}", unit="tok",
               disable=not progress, file=sys.stderr)
    batch_index = 0
    text = start_text
    was_training = model.training
    model.eval()
    try:
        while done_tokens < samples:
            chunk = texts[text: text + batch_size]
            batch = collate(chunk, role="covariance", pad_id=pad_id)
            mask = batch["attention_mask"].bool()
            # only the first `samples` tokens count: mask the excess of the last batch, in reading order
            order = mask.flatten().cumsum(0).view_as(mask)
            mask &= order <= samples - done_tokens
            used = int(mask.sum())
            mask = mask.to(device)
            captured: dict[int, torch.Tensor] = {}

            def grab(x, layer, captured=captured, mask=mask):
                captured[layer] = x[mask].float()

            with torch.no_grad():
                forward_until(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), max(missing),
                              on_down_input={layer: (lambda x, layer=layer: grab(x, layer)) for layer in missing})
            for layer in missing:
                # one batch's products in float32 (a few thousand terms), the running sum over batches in
                # float64: the float64 matrix product would cost several times more on a CPU
                k = captured[layer]
                term = (k.T @ k).double()
                sums[layer] = term if layer not in sums else sums[layer] + term
            done_tokens += used
            text += len(chunk)
            batch_index += 1
            bar.update(used)
            if done_tokens < samples and batch_index % SAVE_EVERY == 0:
                progress_ids = torch.tensor([done_tokens, text], dtype=torch.int64)
                for layer in missing:
                    write_entry(partials[layer], {"sum": sums[layer], "progress": progress_ids},
                                {**materials[layer], "partial": True}, what="MEMIT partial statistics")
    finally:
        bar.close()
        model.train(was_training)
    for layer in missing:
        moment = sums[layer] / done_tokens
        if bool(torch.isfinite(moment).all()):  # NaN statistics are returned (the solve reports them), never kept
            write_entry(paths[layer], {"moment": moment}, materials[layer], what="MEMIT statistics")
        with contextlib.suppress(OSError):  # a read-only folder: the partial sums stay, harmless
            partials[layer].unlink(missing_ok=True)
        moments[layer] = moment
    return CovarianceStats(moments, missing, time.perf_counter() - start, materials)

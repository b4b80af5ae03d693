"""Covariance statistics C = E[k k^T] of the MLP down-projection inputs over the general set R (SPEC section 10).

They depend only on the model, the layer, the corpus and the number of tokens, so they are computed once and
cached on disk under ``<cache>/memit_stats/<model fingerprint>/``. Each batch's sum of k k^T is taken in float32
and the running sum over batches of R in float64; the partial sums are saved every few batches so that an
interrupted computation resumes where it stopped.
Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from editing.data.batching import collate
from editing.data.tokenize import TokenizedExample
from editing.errors import ConfigError
from editing.files import save_atomically
from editing.methods.memit.layers import forward_until
from editing.paths import cache_dir

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


def stats_path(fingerprint: str, layer: int, corpus_sha: str, samples: int, precision: str) -> Path:
    """Cache file of one layer's statistics."""
    return (cache_dir() / "memit_stats" / fingerprint
            / f"layer{layer}_{corpus_sha[:16]}_{samples}_{precision}.safetensors")


def _partial_path(path: Path) -> Path:
    return path.with_name(path.name.replace(".safetensors", ".partial.safetensors"))


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), overwrite=True)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def layer_covariances(model: nn.Module, layers: list[int], texts: list[TokenizedExample], *, fingerprint: str,
                      corpus_sha: str, samples: int, precision: str, batch_size: int = 16, pad_id: int = 0,
                      progress: bool = True) -> CovarianceStats:
    """E[k k^T] of each layer's down-projection input over the first ``samples`` tokens of ``texts``.

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

    Returns:
        The statistics, with which layers were computed now.
    """
    import time

    available = sum(len(t.sequences[0].ids) for t in texts)
    if samples > available:
        raise ConfigError(f"memit.covariance_samples={samples} exceeds the {available} tokens of the general set R; "
                          f"lower it to at most {available}")
    paths = {layer: stats_path(fingerprint, layer, corpus_sha, samples, precision) for layer in layers}
    # the solve that reads them runs on the model's device: files are read there, sums kept there
    device = next(model.parameters()).device
    moments: dict[int, torch.Tensor] = {}
    for layer, path in paths.items():
        if path.is_file():
            tensors, _ = _load(path)
            moments[layer] = tensors["moment"].to(device)
    missing = [layer for layer in layers if layer not in moments]
    if not missing:
        return CovarianceStats(moments, [], 0.0)

    # Resume from the partial sums of the missing layers when they all stopped at the same place; otherwise
    # start these layers over (they are computed in one pass, so they normally share their progress).
    sums: dict[int, torch.Tensor] = {}
    done_tokens, start_text = 0, 0
    partials = {layer: _partial_path(paths[layer]) for layer in missing}
    if all(p.is_file() for p in partials.values()):
        loaded = {layer: _load(p) for layer, p in partials.items()}
        positions = {(m["tokens"], m["next_text"]) for _, m in loaded.values()}
        if len(positions) == 1:
            tokens, next_text = positions.pop()
            done_tokens, start_text = int(tokens), int(next_text)
            sums = {layer: t["sum"].to(device) for layer, (t, _) in loaded.items()}
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
                meta = {"tokens": str(done_tokens), "next_text": str(text)}
                for layer in missing:
                    _atomic_save({"sum": sums[layer].cpu()}, partials[layer], meta)
    finally:
        bar.close()
        model.train(was_training)
    for layer in missing:
        moment = sums[layer] / done_tokens
        _atomic_save({"moment": moment.cpu()}, paths[layer], {"tokens": str(done_tokens), "fingerprint": fingerprint})
        partials[layer].unlink(missing_ok=True)
        moments[layer] = moment
    return CovarianceStats(moments, missing, time.perf_counter() - start)

"""The target optimization's forward pass computing only what delta can change (issues 37 and 38).

Delta is added at one position of each row (the subject's last token, position ``p``) at block ``layer`` (its down
projection's output, or its output). Under causal attention nothing at positions below ``p`` depends on delta, and
nothing below block ``layer`` depends on it at any position. So each row's hidden states entering block ``layer``
and the keys and values of every block at positions ``0 .. p-1`` are the same at every Adam step: they are computed
once per request (``prepare``) by the model's own full forward pass, and each step runs only blocks ``layer`` and up,
at the positions from ``p`` to the last one whose output is scored (the suffix, the KL position), attending to the
stored keys and values through the model's own cache interface (``DynamicCache``). The blocks below ``layer`` are
swapped for a pass-through and a forward pre-hook puts the stored hidden states in at block ``layer``'s input, as the
evaluation's frozen prefix does (``editing.evaluation.incremental``).

Every number a step computes is the full pass's to fp32 rounding: the same products over the same inputs, only
with fewer positions in a matrix product and masked key slots in attention (summation orders may differ in the last
bits). ``tests/methods/test_target_suffix.py`` compares the targets and edits with the full pass and with a plain
loop for every loss type and family.

Layout of a step's batch (``Q`` query slots, ``P`` = the longest ``p`` of the group): the cache holds slots
``0 .. P-1`` of every row as the full pass computed them, row ``r`` seeing only its slots below ``p_r`` (the others
hold later positions and are masked); the new slots ``P .. P+Q-1`` hold row ``r``'s positions ``p_r, p_r + 1, ...``
(right-padded), with explicit position ids, so rotary and learned position embeddings see the true positions.
"""

from __future__ import annotations

import torch
from torch import nn

from editing.models.architecture import blocks, capture_final_hidden, entering_at


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a ``DynamicCache`` (b, heads, s, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _fresh_cache(model: nn.Module, stored: list[tuple[torch.Tensor, torch.Tensor]]):
    """A new ``DynamicCache`` holding ``stored`` (its own copies: a step's update appends to them, never to
    ``stored``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for i, (keys, values) in enumerate(stored):
        cache.update(keys, values, i)
    return cache


def _step_mask(starts: torch.Tensor, real: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """The steps' additive attention mask (b, 1, q, past + q): row r's query slot j sees its past slots below
    ``starts[r]`` and its new slots 0..j (a padding slot sees itself, so no row of the softmax is empty)."""
    b, q = real.shape
    device = real.device
    slot = torch.arange(q, device=device)
    past_ok = torch.arange(past, device=device)[None, None, :] < starts[:, None, None]
    past_ok = past_ok & real[:, :, None]
    causal = slot[None, :] <= slot[:, None]  # (q, q)
    new_ok = (causal[None] & real[:, None, :] & real[:, :, None]) | torch.eye(q, dtype=torch.bool,
                                                                              device=device)[None]
    allowed = torch.cat([past_ok.expand(b, q, past), new_ok.expand(b, q, q)], dim=2)
    return torch.zeros(b, 1, q, past + q, dtype=dtype, device=device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)


def _step_labels(full_labels: torch.Tensor, starts: list[int], lengths: list[int], q: int) -> torch.Tensor:
    """The full pass's labels at each row's new slots (``lengths[r]`` positions from ``starts[r]``), -100 after."""
    labels = torch.full((full_labels.shape[0], q), -100, dtype=torch.long, device=full_labels.device)
    for r, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        labels[r, :length] = full_labels[r, start: start + length]
    return labels


@torch.no_grad()
def prepare(model: nn.Module, group: dict, layer: int, ends: list[int]) -> dict | None:
    """The per-request part of a group's passes: one full forward (no gradient) storing the hidden states entering
    block ``layer`` and every block's keys and values, and the step batch's layout.

    Args:
        model: the model (with whatever edit hooks the steps will see).
        group: a length group of ``compute._length_groups`` (``ids``, ``mask``, ``pos``, ``labels``, ``scored``,
            ``kl_rows``).
        layer: the block at which delta enters (the steps run blocks ``layer`` and up).
        ends: per row of the group, the last position whose output the loss reads.

    Returns:
        The layout (see the module doc), or None when the family's blocks do not return plain tensors or its
        forward pass keeps no ``DynamicCache`` (the caller then runs full passes).
    """
    ids, mask, starts = group["ids"], group["mask"], group["pos"]
    stack = blocks(model)
    seen: dict = {}

    def pre(_module, args, kwargs):
        seen["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    def post(_module, _args, _kwargs, output):
        seen["plain"] = isinstance(output, torch.Tensor)

    handles = [stack[layer].register_forward_pre_hook(pre, with_kwargs=True),
               stack[layer].register_forward_hook(post, with_kwargs=True)]
    try:
        with capture_final_hidden(model):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    cache = getattr(out, "cache", None)
    layers = getattr(cache, "layers", None)
    if not seen.get("plain") or layers is None or len(layers) != len(stack) \
            or any(getattr(lay, "keys", None) is None or lay.keys.shape[-2] != ids.shape[1] for lay in layers):
        return None
    device = ids.device
    b = ids.shape[0]
    starts_list = starts.tolist()
    lengths = [end - start + 1 for start, end in zip(starts_list, ends, strict=True)]
    past, q = max(starts_list), max(lengths)
    slot = torch.arange(q, device=device)
    position = starts[:, None] + slot[None, :]  # (b, q) true positions of the new slots
    real = slot[None, :] < torch.tensor(lengths, device=device)[:, None]
    position = torch.where(real, position, starts[:, None])  # padding slots repeat the first (finite, unread)
    new_ids = ids.gather(1, position)
    hidden = seen["hidden"].gather(1, position[:, :, None].expand(-1, -1, seen["hidden"].shape[-1]))
    attn = _step_mask(starts, real, past, seen["hidden"].dtype)
    # the scored positions in the new slots, in the full pass's (row, position) order
    labels = _step_labels(group["labels"], starts_list, lengths, q)
    if int((labels != -100).sum()) != int(group["scored"].sum()):
        return None  # a scored position below the subject (cannot happen for prompts built by RowBuilder)
    return {"ids": new_ids, "position": position, "hidden": hidden, "mask": attn, "labels": labels,
            # the blocks below ``layer`` are passed through and never read their cache layers: those stay empty
            "scored": labels != -100,
            "stored": [(k[:, :, : past if i >= layer else 0], v[:, :, : past if i >= layer else 0])
                       for i, (k, v) in enumerate(_cache_tensors(cache))],
            "row": torch.arange(b, device=device), "pos": torch.zeros(b, dtype=torch.long, device=device)}


def step_hidden(model: nn.Module, prepared: dict, layer: int) -> torch.Tensor:
    """One step's final hidden states (b, q, d) at the new slots (the LM head's input; the head itself is not
    applied), the inject hook being registered by the caller."""
    cache = _fresh_cache(model, prepared["stored"])
    with entering_at(blocks(model), layer, prepared["hidden"]), capture_final_hidden(model) as store:
        model(input_ids=prepared["ids"], attention_mask=prepared["mask"], position_ids=prepared["position"],
              cache=cache, use_cache=True)
    return store["hidden"]

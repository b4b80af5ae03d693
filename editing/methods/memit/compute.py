"""The MEMIT computation (SPEC section 10): keys, target vectors by gradient steps, and closed-form layer updates."""

from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from editing.core.types import LossType
from editing.methods.memit import suffix
from editing.methods.memit.config import MEMITConfig
from editing.methods.memit.layers import add_to_block_output, add_to_down_output, forward_until, hooks
from editing.methods.memit.requests import Request, Row, RowBuilder, pad_rows
from editing.models.architecture import capture_final_hidden, head_logits
from editing.rules.losses import training_loss

BATCH_ROWS = 64  # rows per forward pass reading activations
HOOK_OF = {"key": "on_down_input", "output": "on_block_output", "value": "on_down_output"}
"""``subject_activations``'s sites: the ``forward_until`` argument that reads each."""
INJECT_AT = {"output": add_to_block_output, "value": add_to_down_output}
"""``optimize_targets``'s sites: where delta is added (MEMIT: the residual stream after the block; ROME: the down
projection's output)."""
KEY_CHUNK = 256
"""Requests whose key rows are tokenized and run at a time by ``request_keys``: a multiple of ``BATCH_ROWS``, so the
forward passes see the same batches as with all requests at once (the same bits), and small enough that a chunk's
activations (chunk x templates x d_mlp floats) stay far below the edit's own (n, d) tensors."""


@torch.no_grad()
def subject_activations(model: nn.Module, rows: list[Row], layer: int, where: str, pad_id: int,
                        batch_rows: int = BATCH_ROWS) -> torch.Tensor:
    """Activations at each row's subject token: ``where="key"`` the down-projection input of ``layer``,
    ``where="output"`` the block output of ``layer``, ``where="value"`` the down-projection output of ``layer`` (as
    edited, when the model carries an edit's hooks). Returns (rows, width) in float64."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start: start + batch_rows]
        ids, mask = pad_rows(chunk, pad_id, device)
        index = torch.arange(len(chunk), device=device)
        pos = torch.tensor([r.subject_pos for r in chunk], device=device)
        store: dict[str, torch.Tensor] = {}

        def grab(x, store=store, index=index, pos=pos):
            store["x"] = x[index, pos].to(torch.float64)

        hook = {HOOK_OF[where]: {layer: grab}}
        forward_until(model, ids, mask, layer, **hook)
        out.append(store["x"])
    return torch.cat(out)


def mean_over_templates(values: torch.Tensor, rows: list[Row], n_requests: int) -> torch.Tensor:
    """Average row values (rows, width) per request."""
    index = torch.tensor([r.request for r in rows], device=values.device)
    sums = torch.zeros(n_requests, values.shape[1], dtype=values.dtype, device=values.device).index_add_(
        0, index, values)
    counts = torch.zeros(n_requests, dtype=values.dtype, device=values.device).index_add_(
        0, index, torch.ones_like(index, dtype=values.dtype))
    return sums / counts[:, None]


@torch.no_grad()
def request_keys(model: nn.Module, builder: RowBuilder, requests: list[Request], templates: list[str], layer: int,
                 last: int, pad_id: int, chunk: int = KEY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The requests' keys at ``layer`` (the down-projection input at the subject's last token, averaged over the
    templates) and their bare prompts' block outputs at ``last``, ``chunk`` requests at a time.

    Only one chunk's rows and activations exist at once, so memory grows with the number of requests only by the
    (n, d) results; the rows of a chunk fall into the same forward batches as when all requests are run together
    (``chunk`` is a multiple of ``BATCH_ROWS``), so the results are the same bits.

    Returns:
        ``keys`` (n, d_mlp) and ``outputs`` (n, d), float64, in request order.
    """
    if chunk < 1 or chunk % BATCH_ROWS:
        raise ValueError(f"the key chunk ({chunk} requests) must be a positive multiple of {BATCH_ROWS}")
    keys, outputs = [], []
    for start in range(0, len(requests), chunk):
        part = requests[start: start + chunk]
        rows = builder.rows(part, templates, with_suffixes=False)
        keys.append(mean_over_templates(subject_activations(model, rows, layer, "key", pad_id), rows, len(part)))
        outputs.append(subject_activations(model, [r for r in rows if r.template == 0], last, "output", pad_id))
    return torch.cat(keys), torch.cat(outputs)


def optimize_targets(model: nn.Module, rewrite: list[Row], kl: list[Row], n_requests: int, n_templates: int,
                     layer: int, loss: LossType | str, cfg: MEMITConfig, pad_id: int,
                     progress: bool | str = False, trace: list[torch.Tensor] | None = None, site: str = "output",
                     decay_power: int = 1, suffix_only: bool = True) -> torch.Tensor:
    """Target hidden states z at ``layer`` for a batch of requests (SPEC section 10; with ``site="value"`` and
    ``decay_power=2``, ROME's target values v*, SPEC section 11).

    A vector delta per request is added to the residual stream at the subject's last token (after block ``layer``)
    of its rows and optimized by Adam for the task loss over the templates, plus ``kl_factor`` times KL(p0 || p)
    at the subject's last token of its "<subject> is a" prompt, plus ``weight_decay * |delta| / |h|``; after each
    step |delta| is clamped to ``clamp_norm_factor * |h|``.

    Long because it is one Adam loop over delta whose every step (the length groups' forward passes with delta
    injected, the task loss scattered back to (request, template, slot) cells, the KL term against the first step's
    log-probabilities, the decay, the clamp) shares delta, the groups, the cells and the first step's
    log-probabilities: it reads as SPEC section 10's objective, term by term, and pieces would pass that state around
    and invite a change in the order of the terms, which changes the targets.

    Args:
        model: the model with no edit applied.
        rewrite: rows (request, template, suffix) with suffixes, request indices in ``0..n_requests-1``.
        kl: one "<subject> is a" row per request.
        n_requests: requests in this batch.
        n_templates: templates per request.
        layer: the last edited layer (where the targets live).
        loss: the task's loss type (a ``LossType`` or its name; an unknown name raises ``ConfigError``).
        cfg: MEMIT settings.
        pad_id: padding token id.
        progress: show a progress bar over the steps (a string: the bar's label, e.g. which requests of how many).
        trace: if given, the task loss per request (n_requests,) at each step is appended to it (for diagnostics).
        site: where delta is added and h read: ``"output"`` the block output (MEMIT), ``"value"`` the down
            projection's output (ROME).
        decay_power: the penalty is ``weight_decay * |delta| / |h| ** decay_power`` (MEMIT 1; ROME's reference
            divides by the square, 2).
        suffix_only: each step runs only blocks ``layer`` and up at the positions delta can change, from stored
            hidden states, keys and values (``editing.methods.memit.suffix``; the same numbers to fp32 rounding);
            false: full forward passes, as before issue 38's speed-up (kept for the comparison in
            ``benchmarks/target_speed.py``). A family the suffix pass cannot serve gets full passes.

    Returns:
        (n_requests, d) float64 targets z = h + delta.
    """
    loss = LossType(loss)
    device = next(model.parameters()).device
    bare = [r for r in rewrite if r.template == 0 and r.slot == 0]
    h = subject_activations(model, bare, layer, site, pad_id).float()  # (n, d), request order
    h_norm = h.norm(dim=1)
    n_slots = max(r.slot for r in rewrite) + 1
    # (request, template, slot) cell of each rewrite row
    cell = torch.tensor([(r.request * n_templates + r.template) * n_slots + r.slot for r in rewrite], device=device)
    kl_req = torch.tensor([r.request for r in kl], device=device)
    groups = _length_groups(rewrite, kl, pad_id, device)
    for g in groups:  # what no step can change, computed once (None: full passes for this group)
        g["suffix"] = suffix.prepare(model, g, layer, _last_read(g)) if suffix_only else None

    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=cfg.lr)
    init_logp = None
    label = progress if isinstance(progress, str) else f"MEMIT targets ({n_requests} requests)"
    bar = tqdm(range(cfg.steps), desc=label, disable=not progress,
               file=sys.stderr, leave=False)
    for _step in bar:
        optimizer.zero_grad(set_to_none=True)
        nll_means, kl_logps = [], []
        for g in groups:
            at = g["suffix"] or g  # the step batch's layout: the suffix pass's slots, or the full rows

            def inject(hidden: torch.Tensor, g=g, at=at) -> torch.Tensor:
                return hidden.index_put((at["row"], at["pos"]), delta[g["req"]].to(hidden.dtype), accumulate=True)

            with hooks([INJECT_AT[site](model, layer, inject)]):
                if g["suffix"] is not None:
                    hidden = suffix.step_hidden(model, g["suffix"], layer)
                else:
                    with capture_final_hidden(model) as store:
                        model(input_ids=g["ids"], attention_mask=g["mask"], use_cache=False)
                    hidden = store["hidden"]
            scored, k = at["scored"], g["kl_rows"]
            if g["suffix"] is not None:  # one product with the head for both terms: its weights are read once
                both = head_logits(model, torch.cat([hidden[scored], hidden[k, at["pos"][k]]]))
                head_out = {"task": both[: int(scored.sum())], "kl": both[int(scored.sum()):]}
            else:
                head_out = {"task": head_logits(model, hidden[scored]) if scored.any() else None,
                            "kl": head_logits(model, hidden[k, at["pos"][k]]) if len(g["kl_at"]) else None}
            if scored.any():
                logits = head_out["task"]
                nll = torch.logsumexp(logits, -1) - logits.gather(1, at["labels"][scored][:, None]).squeeze(1)
                rows = scored.nonzero(as_tuple=True)[0]
                n = len(g["rewrite_at"])
                sums = torch.zeros(n, device=device).index_add(0, rows, nll)
                counts = torch.zeros(n, device=device).index_add(0, rows, torch.ones_like(nll))
                nll_means.append((g["rewrite_at"], sums / counts))
            if len(g["kl_at"]):
                kl_logps.append((g["kl_at"], torch.log_softmax(head_out["kl"], -1)))
        row_means = torch.zeros(len(rewrite), device=device).index_put(
            (torch.cat([i for i, _ in nll_means]),), torch.cat([v for _, v in nll_means]))
        means = torch.zeros(n_requests * n_templates * n_slots, device=device).index_put((cell,), row_means)
        task = training_loss(means.view(-1, n_slots), loss).view(n_requests, n_templates).mean(1)
        kl_at = torch.cat([i for i, _ in kl_logps])
        kl_logp = torch.zeros(len(kl), kl_logps[0][1].shape[1], device=device).index_put(
            (kl_at,), torch.cat([v for _, v in kl_logps]))
        if init_logp is None:
            init_logp = kl_logp.detach()
        kl_term = torch.zeros(n_requests, device=device).index_add(
            0, kl_req, (init_logp.exp() * (init_logp - kl_logp)).sum(-1))
        decay = cfg.weight_decay * delta.norm(dim=1) / (h_norm if decay_power == 1 else h_norm ** decay_power)
        total = (task + cfg.kl_factor * kl_term + decay).sum()
        total.backward()
        if trace is not None:
            trace.append(task.detach())  # kept on the device: the caller moves the whole trace to the CPU once
        bar.set_postfix(task=f"{task.mean().item():.3f}", kl=f"{kl_term.mean().item():.4f}")
        optimizer.step()
        with torch.no_grad():  # keep the change within clamp_norm_factor times the hidden state's norm
            limit = cfg.clamp_norm_factor * h_norm
            norm = delta.norm(dim=1)
            scale = torch.where(norm > limit, limit / norm.clamp(min=1e-12), torch.ones_like(norm))
            delta.mul_(scale[:, None])
    return (h + delta.detach()).double()


def layer_update(keys: torch.Tensor, residual: torch.Tensor, moment: torch.Tensor,
                 covariance_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form update Delta W = R K^T (lambda C + K K^T)^-1 as factors (u, v) with Delta W = u @ v.

    Args:
        keys: (n, d_in) the requests' keys K (one row each).
        residual: (n, d_out) what each request's output must gain, R.
        moment: (d_in, d_in) the second moment C of the keys over R.
        covariance_weight: lambda.

    Returns:
        ``u`` (d_out, n) and ``v`` (n, d_in), float64, solved in float64.
    """
    k = keys.double()
    system = covariance_weight * moment.double().to(k.device) + k.T @ k
    v = torch.linalg.solve(system, k.T).T  # (n, d_in): K^T (lambda C + K K^T)^-1, the system being symmetric
    return residual.double().T.contiguous(), v.contiguous()


GROUP_ROWS = 64  # rows per forward pass of the target optimization


def _last_read(group: dict) -> list[int]:
    """Per row of a length group, the last position whose output the loss reads: a rewrite row's last scored
    position (it predicts the suffix's last token), a KL row's subject position."""
    lengths = group["mask"].sum(1).tolist()
    n_rewrite = len(group["rewrite_at"])
    return [int(lengths[j]) - 2 if j < n_rewrite else int(group["pos"][j]) for j in range(len(lengths))]


def _length_groups(rewrite: list[Row], kl: list[Row], pad_id: int, device) -> list[dict]:
    """Rows sorted by length and batched, so short prompts (the KL ones, the bare ones) are not padded to the
    longest templated prompt; each group records where its rows go in the rewrite and KL lists."""
    rows = [(r, i, False) for i, r in enumerate(rewrite)] + [(r, i, True) for i, r in enumerate(kl)]
    rows.sort(key=lambda item: len(item[0].ids))
    groups = []
    for start in range(0, len(rows), GROUP_ROWS):
        chunk = rows[start: start + GROUP_ROWS]
        ids, mask = pad_rows([r for r, _, _ in chunk], pad_id, device)
        labels = torch.full_like(ids, -100)
        for j, (r, _, is_kl) in enumerate(chunk):
            if not is_kl:  # position p predicts token p + 1: the suffix tokens are scored
                labels[j, r.score_from - 1: len(r.ids) - 1] = torch.tensor(r.ids[r.score_from:], device=device)
        rewrite_rows = [j for j, (_, _, is_kl) in enumerate(chunk) if not is_kl]
        # rewrite rows come first in the group's NLL bookkeeping: relabel the scored mask by rewrite order
        order = torch.tensor(rewrite_rows + [j for j, (_, _, is_kl) in enumerate(chunk) if is_kl], device=device)
        groups.append({
            "ids": ids[order], "mask": mask[order], "labels": labels[order],
            "row": torch.arange(len(chunk), device=device),
            "pos": torch.tensor([chunk[j][0].subject_pos for j in order.tolist()], device=device),
            "req": torch.tensor([chunk[j][0].request for j in order.tolist()], device=device),
            "scored": (labels[order] != -100),
            "rewrite_at": torch.tensor([chunk[j][1] for j in rewrite_rows], device=device, dtype=torch.long),
            "kl_at": torch.tensor([chunk[j][1] for j, (_, _, is_kl) in enumerate(chunk) if is_kl], device=device,
                                  dtype=torch.long),
            "kl_rows": torch.arange(len(rewrite_rows), len(chunk), device=device),
        })
    return groups

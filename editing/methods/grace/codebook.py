"""The GRACE codebook (SPEC section 13): entry rules while editing and output replacement at one module.

The codebook is a module of buffers (keys, values, radii, labels), so it moves with the model it is attached to and
its state is in the model's state dict. ``attach`` makes it a child of the wrapped module and hooks that module's
forward: at each position whose input lies within eps of the nearest key, the output is that entry's value; every
other position is the module's own output, untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from editing.core.errors import ConfigError

CHILD = "grace_codebook"
"""The codebook's name as a child of the wrapped module (its state-dict entries are ``<module>.grace_codebook.*``)."""
SPANS = ("position", "following")
PAD = -1
"""Padding of the label rows (labels are token ids, never negative)."""
SEPARATOR = -2
"""Between the suffixes of a two-suffix example's label."""
BUFFERS = ("keys", "values", "eps", "labels")
CODEBOOK_FILE = "grace_codebook.safetensors"
"""A saved GRACE edit's one tensor file (``editing.methods.grace.edit``)."""
COVER = 1e-5
"""Relative slack of a grown radius: fp32 distances computed in another batch layout round differently (measured
here: cdist of one query alone and of the same query among a batch's positions differ in the last bits), so a radius
set to exactly the query's distance may miss that query when it is met again; 1e-5 covers the rounding of sums over
tens of thousands of fp32 terms."""


def distances(inputs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Euclidean distances in fp32 from each row of ``inputs`` (..., d) to each key (n, d): (..., n), pair by pair
    (cdist's matrix-product path, |x|^2 - 2 x.k + |k|^2, loses the small distances that decide a match)."""
    flat = inputs.reshape(-1, inputs.shape[-1]).float()
    out = torch.cdist(flat, keys.float(), compute_mode="donot_use_mm_for_euclid_dist")
    return out.reshape(*inputs.shape[:-1], keys.shape[0])


class Codebook(nn.Module):
    """Entries (key, value, eps, label) of one wrapped module; keys, values and radii in fp32.

    Args:
        d_in: width of the module's input (the keys).
        d_out: width of its output (the values).
        span: ``position`` (replace each matching position) or ``following`` (and every later one of the sequence).
    """

    def __init__(self, d_in: int, d_out: int, span: str = "position") -> None:
        super().__init__()
        if span not in SPANS:
            raise ValueError(f"span must be one of {SPANS}, not {span!r}")
        self.span = span
        self.register_buffer("keys", torch.zeros(0, d_in))
        self.register_buffer("values", torch.zeros(0, d_out))
        self.register_buffer("eps", torch.zeros(0))
        self.register_buffer("labels", torch.zeros(0, 0, dtype=torch.long))
        self.enabled = True
        self.live: tuple[int, torch.Tensor] | None = None
        """(entry, value) while that entry's value is trained: the replacement uses this tensor (with its gradient)
        in place of the stored value."""
        self.capture: dict[str, torch.Tensor] | None = None
        """When a dict, each forward stores the module's own ``inputs`` and ``outputs`` in it (before replacement)."""

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def label(self, i: int) -> tuple[int, ...]:
        """Entry ``i``'s label (the target ids of the example that made it)."""
        return tuple(int(t) for t in self.labels[i].tolist() if t != PAD)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """A context in which the wrapped module computes its own output everywhere (p0)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = previous

    def set_entries(self, keys: torch.Tensor, values: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace every entry (e.g. from a saved edit or a checkpoint), on the codebook's device."""
        device = self.keys.device
        self.keys = keys.detach().float().to(device).clone()
        self.values = values.detach().float().to(device).clone()
        self.eps = eps.detach().float().to(device).clone()
        self.labels = labels.detach().long().to(device).clone()

    def add_query(self, query: torch.Tensor, label: tuple[int, ...], init_eps: float, value: torch.Tensor) -> int:
        """Apply SPEC 13's rule for one canonical example's query; return the index of the entry to train.

        Empty codebook, or the nearest key farther than its eps + init_eps: a new entry (key q, eps init_eps, the
        given value). Nearer with the same label: that entry's eps grows to cover q (to the distance, ``COVER``
        above it). Nearer with another label: both radii become half the distance (the new entry's key is q).

        Args:
            query: the module input at the last prefix token, shape (d_in,).
            label: the example's target ids.
            init_eps: the radius of a new entry.
            value: the value a new entry gets (cold or warm), shape (d_out,).
        """
        q = query.detach().float().to(self.keys.device)
        label = tuple(int(t) for t in label)
        radius = float(init_eps)
        if len(self):
            dists = distances(q[None], self.keys)[0]
            i = int(torch.argmin(dists))
            d = float(dists[i])
            if d <= float(self.eps[i]) + init_eps:
                if self.label(i) == label:
                    self.eps[i] = max(float(self.eps[i]), d * (1 + COVER))
                    return i
                self.eps[i] = d / 2
                radius = d / 2
        self._append(q, value, radius, label)
        return len(self) - 1

    def _append(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...]) -> None:
        width = max(self.labels.shape[1], len(label))
        labels = torch.full((len(self) + 1, width), PAD, dtype=torch.long, device=self.labels.device)
        labels[:-1, : self.labels.shape[1]] = self.labels
        labels[-1, : len(label)] = torch.tensor(label, dtype=torch.long)
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, value.detach().float().to(self.values.device)[None]])
        self.eps = torch.cat([self.eps, torch.full((1,), radius, device=self.eps.device)])
        self.labels = labels

    def replace(self, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """``outputs`` (B, T, d_out) with the value of the nearest entry wherever ``inputs`` (B, T, d_in) lie within
        its eps (and, for ``following``, at every later position of that sequence, with the value of the last
        matching position before it)."""
        if self.capture is not None:
            self.capture["inputs"], self.capture["outputs"] = inputs.detach(), outputs.detach()
        if not self.enabled or not len(self):
            return outputs
        nearest, idx = distances(inputs, self.keys).min(dim=-1)
        hit = nearest <= self.eps[idx]
        values = self.values
        if self.live is not None:
            i, live = self.live
            values = torch.cat([values[:i], live[None].float(), values[i + 1:]])
        vals = values.to(outputs.dtype)[idx]
        if self.span == "following":
            # every position from the first hit on takes the value of the last hit at or before it
            pos = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
            last = torch.cummax(torch.where(hit, pos, torch.zeros_like(pos)), dim=1).values
            vals = torch.gather(vals, 1, last.unsqueeze(-1).expand_as(vals))
            hit = torch.cummax(hit.int(), dim=1).values.bool()
        return torch.where(hit.unsqueeze(-1), vals, outputs)


def _hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, CHILD).replace(args[0], output)


def projection_widths(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a projection: an ``nn.Linear`` stores (out, in), GPT-2's Conv1D (in, out)."""
    weight = module.weight
    return (weight.shape[1], weight.shape[0]) if isinstance(module, nn.Linear) else (weight.shape[0], weight.shape[1])


def attach(module: nn.Module, codebook: Codebook) -> torch.utils.hooks.RemovableHandle:
    """Make ``codebook`` a child of ``module`` (so it moves with the model) and hook the module's forward with it.

    Raises:
        ValueError: the module carries a codebook already.
    """
    if hasattr(module, CHILD):
        raise ValueError(f"{type(module).__name__} carries a GRACE codebook already")
    module.add_module(CHILD, codebook)
    return module.register_forward_hook(_hook)


def read_codebook_file(folder: str | Path) -> dict[str, torch.Tensor]:
    """The codebook tensors of a saved GRACE edit folder, verified against its manifest (for a sequence's next step).

    Raises:
        ConfigError: the folder holds no GRACE codebook, or its tensors fail verification.
    """
    from editing.runs.manifest import verify_edit

    files = verify_edit(folder)
    if CODEBOOK_FILE not in files:
        raise ConfigError(f"{folder} holds no {CODEBOOK_FILE}: pass an edit folder saved by a GRACE fit")
    return files[CODEBOOK_FILE]

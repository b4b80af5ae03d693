"""The GRACE codebook (SPEC section 13): entry rules while editing and output replacement at one module."""

from __future__ import annotations

import torch


class Codebook:
    """Entries (key, value, eps, label); keys and distances in fp32."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.eps: list[float] = []
        self.labels: list[tuple[int, ...]] = []

    def add_query(self, query: torch.Tensor, label: tuple[int, ...], init_eps: float, value: torch.Tensor) -> int:
        """Apply SPEC 13's rule for one canonical example's query; return the index of the entry to train.

        Args:
            query: the module input at the last prefix token, shape (d_in,).
            label: the example's target ids.
            init_eps: the radius of a new entry.
            value: the value a new entry gets (cold or warm).
        """
        q = query.detach().float()
        if self.keys:
            dists = torch.stack([torch.linalg.vector_norm(k - q) for k in self.keys])
            i = int(torch.argmin(dists))
            d = float(dists[i])
            if d <= self.eps[i] + init_eps:
                if self.labels[i] == tuple(label):
                    self.eps[i] = max(self.eps[i], d)
                    return i
                self.eps[i] = d / 2
                self.keys.append(q)
                self.values.append(value.detach().clone())
                self.eps.append(d / 2)
                self.labels.append(tuple(label))
                return len(self.keys) - 1
        self.keys.append(q)
        self.values.append(value.detach().clone())
        self.eps.append(float(init_eps))
        self.labels.append(tuple(label))
        return len(self.keys) - 1

    def apply(self, inputs: torch.Tensor, outputs: torch.Tensor, span: str = "position") -> torch.Tensor:
        """Replace ``outputs`` (B, T, d_out) where ``inputs`` (B, T, d_in) lie within eps of the nearest key."""
        if not self.keys:
            return outputs
        keys = torch.stack(self.keys)
        dists = torch.cdist(inputs.float(), keys.unsqueeze(0).expand(inputs.shape[0], -1, -1))
        nearest, idx = dists.min(dim=-1)
        hit = nearest <= torch.tensor(self.eps, device=inputs.device)[idx]
        vals = torch.stack(self.values).to(outputs.dtype)[idx]
        if span == "following":
            first = torch.cummax(hit.int(), dim=1).values.bool()
            # A later position takes the value of the last matching entry before it.
            pos = torch.arange(hit.shape[1], device=hit.device).expand_as(hit)
            last = torch.cummax(torch.where(hit, pos, torch.zeros_like(pos)), dim=1).values
            vals = torch.gather(vals, 1, last.unsqueeze(-1).expand_as(vals))
            hit = first
        return torch.where(hit.unsqueeze(-1), vals, outputs)

"""ROME's closed-form rank-one update (SPEC section 11)."""

from __future__ import annotations

import torch


def rank_one_update(key: torch.Tensor, bare_key: torch.Tensor, bare_value: torch.Tensor, target: torch.Tensor,
                    moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta W = (v* - W k0) u^T / (u^T k0) with u = C^-1 k*, as factors (column, row), solved in float64.

    The update maps the bare prompt's key k0 exactly to v*: (W + Delta W) k0 = W k0 + (v* - W k0) = v*.

    Args:
        key: k* (d_in,), the key averaged over the context templates.
        bare_key: k0 (d_in,), the key of the bare prompt (where the value is inserted).
        bare_value: W k0 (d_out,), the projection's output at k0 as the model computes it now (bias and earlier
            edits included).
        target: v* (d_out,).
        moment: C (d_in, d_in), or the identity when the statistics are off.

    Returns:
        ``column`` (d_out, 1) and ``row`` (1, d_in), float64, with Delta W = column @ row.
    """
    u = torch.linalg.solve(moment.double().to(key.device), key.double().reshape(-1))
    scale = u @ bare_key.double().reshape(-1)
    column = (target.double().reshape(-1) - bare_value.double().reshape(-1)) / scale
    return column[:, None].contiguous(), u[None, :].contiguous()

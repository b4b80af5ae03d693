"""AlphaEdit's null-space projector and its constrained closed-form update (SPEC section 12).

The projector is a number of the base model alone (of C), so it is cached beside the statistics it derives from
(``<cache>/memit_stats/<fingerprint>/projector_*.safetensors``, a checked ``editing.caches.entries`` entry).

Key covers (``projector_material``): the statistics' own cache key (``CovarianceStats.materials``: weights, layer,
token ids of R, sample count, batch size, padding, dtype, device, code, libraries) and the content hash of C's bytes,
the threshold, the dtype and device (with the matmul settings) the eigendecomposition runs on, the code digest of
this module and the library versions. Why that is enough: P is ``eigh`` of exactly that C on that device, cut at
the threshold; nothing else enters ``null_space_projector``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from editing.caches.entries import canonical_json, read_entry, write_entry
from editing.caches.keys import numerics
from editing.core.digests import code_digest, library_versions, tensor_sha256
from editing.core.paths import cache_dir

PROJECTOR_CODE = ("editing.methods.alphaedit.compute",)
"""The code that computes the projector (this module and what it imports)."""


def projector_material(moment: torch.Tensor, threshold: float, statistics: dict | None) -> dict:
    """What the projector of ``moment`` at ``threshold`` depends on (its cache key; see the module docstring)."""
    return {"kind": "alphaedit projector", "statistics": statistics,
            "moment": tensor_sha256({"moment": moment.detach().double().cpu()}), "threshold": float(threshold),
            "code": code_digest(*PROJECTOR_CODE), "libraries": library_versions(), "dtype": "torch.float64",
            **numerics(moment.device)}


def projector_path(material: dict) -> Path:
    """The projector's cache file, beside the statistics it derives from."""
    key = hashlib.sha256(canonical_json(material).encode()).hexdigest()[:24]
    statistics = material.get("statistics") or {}
    folder = str(statistics.get("fingerprint", "unkeyed")).replace(":", "-")
    return cache_dir() / "memit_stats" / folder / f"projector_layer{statistics.get('layer', 'x')}_{key}.safetensors"


def _projector_shape(width: int):
    def check(tensors: dict[str, torch.Tensor]) -> str | None:
        p = tensors.get("projector")
        if p is None or p.dtype != torch.float64 or tuple(p.shape) != (width, width):
            return f"does not hold a float64 ({width}, {width}) projector"
        return None

    return check


def null_space_projector(moment: torch.Tensor, threshold: float, statistics: dict | None = None,
                         cache: bool = True) -> tuple[torch.Tensor, bool]:
    """P = U0 U0^T, U0 the eigenvectors of C whose eigenvalues are below ``threshold`` (float64).

    Args:
        moment: C (d, d), on the device the solve runs on.
        threshold: the eigenvalue bound of the null space.
        statistics: C's own cache key (part of P's).
        cache: read and write the cache entry (false: always compute, nothing written).

    Returns:
        P on ``moment``'s device, and whether it was computed now (False: read from the cache).
    """
    material = projector_material(moment, threshold, statistics) if cache else None
    if material is not None:
        path = projector_path(material)
        found = read_entry(path, material, what="AlphaEdit projector", finite=True,
                           check=_projector_shape(moment.shape[0]))
        if found is not None:
            return found["projector"].to(moment.device), False
    values, vectors = torch.linalg.eigh(moment.double())
    null = vectors[:, values < threshold]
    projector = null @ null.T
    if material is not None:
        write_entry(path, {"projector": projector}, material, what="AlphaEdit projector")
    return projector, True


def null_space_update(keys: torch.Tensor, residual: torch.Tensor, projector: torch.Tensor,
                      previous_keys: torch.Tensor | None, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta^T = (P (K K^T + Kp Kp^T) + L2 I)^-1 P K R^T as factors (u, v) with Delta W = u @ v, in float64.

    The solution lies in P's range (A x = P b with A = P M + L2 I gives x = P (b - M x) / L2), so
    Delta W P = Delta W: the update leaves the general corpus's principal key directions alone.

    Args:
        keys: (n, d_in) the requests' keys K (one row each).
        residual: (n, d_out) what each request's output must gain, R (one row each).
        projector: (d_in, d_in) P.
        previous_keys: (m, d_in) Kp, the keys of earlier edits of a sequence (None or empty: none).
        l2: L2.

    Returns:
        ``u`` (d_out, n) and ``v`` (n, d_in), float64.
    """
    k = keys.double()
    p = projector.double().to(k.device)
    gram = k.T @ k
    if previous_keys is not None and previous_keys.numel():
        kp = previous_keys.double().to(k.device)
        gram = gram + kp.T @ kp
    system = p @ gram + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    v = torch.linalg.solve(system, p @ k.T).T  # (n, d_in): rows of (A^-1 P K)^T
    return residual.double().T.contiguous(), v.contiguous()

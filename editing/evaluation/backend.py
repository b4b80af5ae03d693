"""fp32 matrix-product backends, checked for exactness (issue 37 items 1-2).

The same fp32 ``x @ W.T`` can run on several of torch's CPU paths: the default kernels, oneDNN's math modes
(``torch.backends.mkldnn.matmul.fp32_precision``), ``torch.set_float32_matmul_precision``, the non-oneDNN path. On one
CPU a mode may run faster fp32 kernels; on another the same mode rounds its inputs to bf16 (an error near 1e-3,
which moves the 1e-5 ball's decisions). So every mode's error is measured against float64 on this machine before
its speed counts: a mode is *exact* when its error is within ``EXACT_FACTOR`` of the default fp32 product's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

EXACT_FACTOR = 8.0
"""A mode is exact when its relative RMS error against float64 is at most this many times the default fp32
product's on the same operands (fp32 differs from fp32 by a small factor; tf32 and bf16 are 100x-10,000x off)."""


@contextmanager
def _mkldnn_precision(value: str) -> Iterator[None]:
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


@contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@contextmanager
def _mkldnn_off() -> Iterator[None]:
    with torch.backends.mkldnn.flags(enabled=False):
        yield


@contextmanager
def _default() -> Iterator[None]:
    yield


MODES: dict[str, Callable[[], object]] = {
    "default": _default,
    "mkldnn-off": _mkldnn_off,
    "fpmath-ieee": lambda: _mkldnn_precision("ieee"),
    "fpmath-tf32": lambda: _mkldnn_precision("tf32"),
    "fpmath-bf16": lambda: _mkldnn_precision("bf16"),
    "matmul-precision-high": lambda: _matmul_precision("high"),
    "matmul-precision-medium": lambda: _matmul_precision("medium"),
}
"""Each mode: a context manager factory under which torch's fp32 products take that path."""


@dataclass(frozen=True)
class ModeResult:
    """One mode on one shape: seconds per product (median) and relative RMS error against float64."""

    seconds: float
    error: float


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS of ``out - exact`` relative to the RMS of ``exact`` (float64)."""
    scale = exact.pow(2).mean().sqrt().item()
    return (out.double() - exact).pow(2).mean().sqrt().item() / max(scale, 1e-300)


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def operands(tokens: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` (tokens, k), a linear layer's ``W`` (n, k) scaled like a trained layer, and the float64 ``x @ W.T``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    return x, w, x.double() @ w.double().T


def measure_mode(mode: str, x: torch.Tensor, w: torch.Tensor, exact: torch.Tensor, repeat: int,
                 modes: dict[str, Callable[[], object]] | None = None) -> ModeResult:
    """Time ``torch.nn.functional.linear(x, w)`` (the evaluator's product) under ``mode`` and measure its error."""
    with (modes or MODES)[mode]():
        out = torch.nn.functional.linear(x, w)
        error = relative_error(out, exact)
        seconds = median_seconds(lambda: torch.nn.functional.linear(x, w), repeat)
    return ModeResult(seconds, error)


def is_exact(error: float, default_error: float) -> bool:
    """Whether an error is fp32's (within ``EXACT_FACTOR`` of the default product's), not tf32's or bf16's."""
    return error <= EXACT_FACTOR * max(default_error, 1e-9)


@dataclass
class Choice:
    """The fastest exact mode, each exact mode's total seconds, and each rejected mode's worst error."""

    mode: str
    seconds: dict[str, float]
    rejected: dict[str, float]


def choose_mode(shapes: list[tuple[int, int, int]], repeat: int = 3,
                modes: dict[str, Callable[[], object]] | None = None,
                faster: dict[str, float] | None = None) -> Choice:
    """The fastest mode whose error is fp32's on every ``(tokens, k, n)`` shape; ``default`` when none beats it.

    Args:
        shapes: the products to time (a model's layers at the evaluator's batch size).
        repeat: timed calls per mode and shape (median).
        modes: the candidates (default ``MODES``); must include ``default``.
        faster: seconds that replace a mode's measured total (tests: a mode that would win on speed).
    """
    modes = modes or MODES
    seconds: dict[str, float] = {}
    rejected: dict[str, float] = {}
    for shape in shapes:
        x, w, exact = operands(*shape)
        reference = measure_mode("default", x, w, exact, repeat, modes)
        for mode in modes:
            result = reference if mode == "default" else measure_mode(mode, x, w, exact, repeat, modes)
            if not is_exact(result.error, reference.error):
                rejected[mode] = max(rejected.get(mode, 0.0), result.error)
            seconds[mode] = seconds.get(mode, 0.0) + result.seconds
    exact_modes = {m: (faster or {}).get(m, s) for m, s in seconds.items() if m not in rejected}
    return Choice(min(exact_modes, key=exact_modes.get), exact_modes, rejected)

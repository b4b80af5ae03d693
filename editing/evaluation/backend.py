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
EXACT_CAP = 1e-5
"""And never above this relative error, whatever the default's: bf16 rounding gives about 2e-3, tf32 about 2e-4."""
MARGIN = 0.10
"""A mode other than ``default`` is chosen only when it is at least this fraction faster than ``default``: a tie
within timing noise must not flip the choice (and with it the last bits of every number) between machines alike."""


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


PACKED = "mkl-packed"
"""The mode whose linear layers run MKL's packed-weight product (``packed_product``): each weight laid out once for
MKL's GEMM per evaluation (``editing.evaluation.packed.packed_linears``) instead of on every call; every other
product runs the default kernels. On the Xeon measured it was the fastest exact way for most of SmolLM2's products
(``benchmarks/roofline.py``) and gives the default's bits."""
PACKED_ROWS = 1024
"""The row count MKL packs a weight for: the evaluator's tokens per batch (``max_tokens``); any row count runs."""


def packing_available() -> bool:
    """Whether this torch has MKL's packed linear (x86 builds with MKL)."""
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl, "_mkl_linear")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (n, k) fp32 laid out for ``packed_product``."""
    return torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACKED_ROWS)


def packed_product(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the weight packed by ``pack``: fp32 on a CPU, a non-empty ``x`` with
    rows in its last-but-one dimension; anything else takes ``F.linear``."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() == 0 or not x.is_contiguous():
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, PACKED_ROWS)


def product(mode: str, x: torch.Tensor, w: torch.Tensor,
            modes: dict[str, Callable[[], object]] | None = None) -> Callable[[], torch.Tensor]:
    """The evaluator's product ``x @ w.T`` under ``mode``, as a call (the packing done once, before it)."""
    if mode == PACKED:
        packed = pack(w)
        return lambda: packed_product(x, w, packed)
    context = (modes or MODES)[mode]

    def call() -> torch.Tensor:
        with context():
            return torch.nn.functional.linear(x, w)
    return call


MODES: dict[str, Callable[[], object]] = {
    "default": _default,
    "mkldnn-off": _mkldnn_off,
    "fpmath-ieee": lambda: _mkldnn_precision("ieee"),
    "fpmath-tf32": lambda: _mkldnn_precision("tf32"),
    "fpmath-bf16": lambda: _mkldnn_precision("bf16"),
    "matmul-precision-high": lambda: _matmul_precision("high"),
    "matmul-precision-medium": lambda: _matmul_precision("medium"),
}
"""Each mode: a context manager factory under which torch's fp32 products take that path (``PACKED``: the default
path, its linear layers packed by the evaluator)."""
if packing_available():
    MODES[PACKED] = _default


@dataclass(frozen=True)
class ModeResult:
    """One mode on one shape: seconds per product (median), relative RMS error against float64, and the output."""

    seconds: float
    error: float
    output: torch.Tensor | None = None


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    """RMS of ``out - exact`` relative to the RMS of ``exact`` (float64): the ratio of their 2-norms, the means'
    counts cancelling (one pass each, no squared temporaries: the head's outputs are tens of millions of values)."""
    scale = torch.linalg.vector_norm(exact).item()
    return torch.linalg.vector_norm(out.double() - exact).item() / max(scale, 1e-300)


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
    """Time the evaluator's product of ``x`` and ``w`` under ``mode`` (``product``) and measure its error."""
    call = product(mode, x, w, modes)
    out = call()
    return ModeResult(median_seconds(call, repeat), relative_error(out, exact), out)


def is_exact(error: float, default_error: float) -> bool:
    """Whether an error is fp32's (within ``EXACT_FACTOR`` of the default product's and below ``EXACT_CAP``), not
    tf32's or bf16's."""
    return error == error and error <= min(EXACT_FACTOR * max(default_error, 1e-9), EXACT_CAP)


def _attention_products(seed: int = 0) -> list[tuple[Callable[[], torch.Tensor], torch.Tensor]]:
    """The attention's own products (``bmm`` of scores, causal ``scaled_dot_product_attention``) with their float64
    results: a math mode may route them through other kernels than the linear layers'."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 9, 96, 64, generator=gen) for _ in range(3))
    a, b = torch.randn(9, 96, 64, generator=gen), torch.randn(9, 64, 96, generator=gen) / 8.0
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return [(lambda: torch.bmm(a, b), torch.bmm(a.double(), b.double())),
            (lambda: sdpa(q, k, v, is_causal=True), sdpa(q.double(), k.double(), v.double(), is_causal=True))]


CHECK_SHAPES: list[tuple[int, int, int]] = [(1, 64, 96), (7, 576, 192), (64, 576, 1536), (300, 1536, 576)]
"""Products whose error (not speed) every mode must pass besides the timed ones: one row (a single scored
position), odd row counts, the model's widths; a library may pick another kernel for a small product."""


def check_errors(modes: dict[str, Callable[[], object]] | None = None) -> dict[str, tuple[float, bool]]:
    """Each mode's worst relative error over ``CHECK_SHAPES`` and the attention products, and whether it is exact
    (``is_exact`` against the default's error on the same product) on every one of them."""
    modes = modes or MODES
    linear = [operands(*shape) for shape in CHECK_SHAPES]
    attention = _attention_products()
    found: dict[str, tuple[float, bool]] = {}
    for number in range(len(linear) + len(attention)):
        calls: dict[str, Callable[[], torch.Tensor]]
        if number < len(linear):
            x, w, exact = linear[number]
            calls = {mode: product(mode, x, w, modes) for mode in modes}
        else:
            fn, exact = attention[number - len(linear)]
            calls = {mode: (lambda fn=fn, mode=mode: _under(modes[mode], fn)) for mode in modes}
        reference = relative_error(calls["default"](), exact)
        for mode in modes:
            error = relative_error(calls[mode](), exact)
            worst, exact_so_far = found.get(mode, (0.0, True))
            found[mode] = (max(worst, error), exact_so_far and is_exact(error, reference))
    return found


def _under(context: Callable[[], object], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with context():
        return fn()


@dataclass
class Choice:
    """The fastest exact mode, each exact mode's total seconds, and each rejected mode's worst error."""

    mode: str
    seconds: dict[str, float]
    rejected: dict[str, float]


def choose_mode(shapes: list[tuple[int, int, int]], repeat: int = 3,
                modes: dict[str, Callable[[], object]] | None = None,
                faster: dict[str, float] | None = None, weights: list[float] | None = None,
                margin: float = 0.0, checks: bool = False) -> Choice:
    """The fastest mode whose error is fp32's on every ``(tokens, k, n)`` shape; ``default`` when none beats it.

    Args:
        shapes: the products to time (a model's layers at the evaluator's batch size).
        repeat: timed calls per mode and shape (median).
        modes: the candidates (default ``MODES``); must include ``default``.
        faster: seconds that replace a mode's measured total (tests: a mode that would win on speed).
        weights: how many times each shape's product runs per pass (default 1 each): the totals compared.
        margin: a mode other than ``default`` must be this fraction faster than it (``MARGIN`` for a machine's
            choice; 0 picks the fastest). A mode whose outputs all have the default's bits counts the default's
            time (the same kernels).
        checks: also require fp32's error on ``check_errors``'s products (small shapes, attention).
    """
    modes = modes or MODES
    weights = weights or [1.0] * len(shapes)
    seconds: dict[str, float] = {}
    rejected: dict[str, float] = {}
    same_bits = dict.fromkeys(modes, True)
    for shape, weight in zip(shapes, weights, strict=True):
        x, w, exact = operands(*shape)
        reference = measure_mode("default", x, w, exact, repeat, modes)
        for mode in modes:
            if mode == "default":
                result = reference
            elif mode == PACKED:  # the default's bits, but not its kernels' cost: the point is skipping a repack
                same_bits[mode] = False
                result = measure_mode(mode, x, w, exact, repeat, modes)
            else:
                out = product(mode, x, w, modes)()
                # the default's bits: the default's kernels, not worth timing (a difference would be noise)
                same_bits[mode] = same_bits[mode] and torch.equal(out, reference.output)
                result = (ModeResult(reference.seconds, relative_error(out, exact), out) if same_bits[mode]
                          else measure_mode(mode, x, w, exact, repeat, modes))
            if not is_exact(result.error, reference.error):
                rejected[mode] = max(rejected.get(mode, 0.0), result.error)
            seconds[mode] = seconds.get(mode, 0.0) + weight * result.seconds
    if checks:
        for mode, (error, exact) in check_errors(modes).items():
            if not exact:
                rejected[mode] = max(rejected.get(mode, 0.0), error)
    exact_modes = {m: (faster or {}).get(m, s) for m, s in seconds.items() if m not in rejected}
    best = min(exact_modes, key=exact_modes.get)
    if best != "default" and exact_modes[best] > (1.0 - margin) * exact_modes.get("default", float("inf")):
        best = "default"
    return Choice(best, exact_modes, rejected)

"""Can the AMX units give fp32-faithful matrix products? Times and errors of four ways to multiply fp32 matrices.

Issue 13 item 3. This CPU's AMX units run bf16 products about ten times faster than fp32 ones, but a bf16 product
rounds its inputs to 8 bits of mantissa (and, through torch, its output to bf16 as well). The ways compared, on the
shapes of one SmolLM2 evaluation batch (1024 tokens; hidden 576, MLP 1536, vocabulary 49152 for the scored head):

- ``fp32``: IEEE fp32 products (the evaluator's default);
- ``fpmath-bf16``: fp32 tensors with oneDNN's bf16 math mode (``torch.backends.mkldnn.matmul.fp32_precision =
  "bf16"``): inputs rounded to bf16, products accumulated and returned in fp32;
- ``split-bf16``: each fp32 operand split as hi + lo, both exactly bf16, and the three products hi*hi + hi*lo + lo*hi
  in the bf16 math mode, summed in fp32 (about 16 bits of each operand kept); the weight's split is precomputed,
  as an evaluation would do once per edit;
- ``bf16``: bf16 tensors (the output rounded to bf16 too).

Errors are against float64 products, relative to the output's RMS, and printed next to fp32's own. Times are the
median of ``--repeat`` runs at the thread counts given.

    OMP_NUM_THREADS=2 python benchmarks/amx_matmul.py [--tokens 1024] [--threads 1,2] [--repeat 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from editing.evaluation.backend import relative_error

SHAPES = {"attention q/o (576x576)": (576, 576), "MLP up/gate (576x1536)": (576, 1536),
          "MLP down (1536x576)": (1536, 576), "LM head (576x49152)": (576, 49152)}


def _split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(torch.bfloat16).to(torch.float32)
    return hi, (t - hi).to(torch.bfloat16).to(torch.float32)


def _median_seconds(fn: Callable[[], torch.Tensor], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _math_mode(mode: str) -> None:
    torch.backends.mkldnn.matmul.fp32_precision = mode


def measure(tokens: int, k: int, n: int, repeat: int) -> dict[str, tuple[float, float]]:
    """Seconds and relative RMS error of each way, for a (tokens x k) by (k x n) product."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=gen)
    w = torch.randn(k, n, generator=gen) / k**0.5
    exact = x.double() @ w.double()
    w_hi, w_lo = _split(w)
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)

    def split_product() -> torch.Tensor:
        x_hi, x_lo = _split(x)
        return torch.addmm(torch.addmm(x_hi @ w_lo, x_lo, w_hi), x_hi, w_hi)

    ways: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {
        "fp32": ("ieee", lambda: x @ w),
        "fpmath-bf16": ("bf16", lambda: x @ w),
        "split-bf16": ("bf16", split_product),
        "bf16": ("ieee", lambda: xb @ wb),
    }
    out = {}
    try:
        for name, (mode, fn) in ways.items():
            _math_mode(mode)
            seconds = _median_seconds(fn, repeat)
            error = relative_error(fn(), exact)  # the measure the product-mode choice uses
            out[name] = (seconds, error)
    finally:
        _math_mode("ieee")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="rows of the activation matrix (a batch's tokens)")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}; {args.tokens} tokens; median of {args.repeat}; errors: RMS relative to the "
          "output's RMS, against float64")
    print("| threads | shape | way | ms | GFLOP/s | speed-up vs fp32 | relative error |")
    print("|---|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for label, (k, n) in SHAPES.items():
            results = measure(args.tokens, k, n, args.repeat)
            flops = 2.0 * args.tokens * k * n
            base = results["fp32"][0]
            for name, (seconds, error) in results.items():
                print(f"| {threads} | {label} | {name} | {1e3 * seconds:.2f} | {flops / seconds / 1e9:.0f} | "
                      f"{base / seconds:.2f}x | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()

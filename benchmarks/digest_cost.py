"""What the content-hash cache keys cost (issue 34, item 2): each digest of a key, timed on a real model.

For the model's weights: the content fingerprint (SHA-256 of every tensor's bytes, made once per load) against the
old per-tensor-sum fingerprint it replaced; the frozen-prefix digest at the main job's LoRA start block and the whole
state's digest (made once per evaluated epoch); and ``code_digest`` of the evaluation code (the first call in a
process reads and hashes the source files, later calls only the live functions). Prints the CPU model and the median
of ``--repeats`` runs.

    python benchmarks/digest_cost.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from editing.core.digests import code_digest
    from editing.evaluation.caching import EVALUATION_CODE
    from editing.evaluation.incremental import prefix_digest, tensor_digest
    from editing.models.architecture import num_layers
    from editing.models.loading import fingerprint, legacy_fingerprint, load_model

    torch.set_num_threads(2)
    model = load_model(name=args.model, precision="fp32").model
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    layers = num_layers(model.config)
    start_block = layers // 2 - max(1, int(0.2 * layers))  # about where the main LoRA starts
    cold_start = time.perf_counter()
    code_digest(*EVALUATION_CODE)
    cold = time.perf_counter() - cold_start
    rows = [
        ("model fingerprint, content SHA-256 (once per load)",
         _median_seconds(lambda: fingerprint(model), args.repeats)),
        ("model fingerprint, old per-tensor sums", _median_seconds(lambda: legacy_fingerprint(model), args.repeats)),
        (f"frozen-prefix digest below block {start_block} (once per epoch)",
         _median_seconds(lambda: prefix_digest(model, start_block), args.repeats)),
        ("whole state digest (sense edits, once per epoch)",
         _median_seconds(lambda: tensor_digest(sorted(model.state_dict().items())), args.repeats)),
        ("code digest of the evaluation code, first call", cold),
        ("code digest of the evaluation code, later calls",
         _median_seconds(lambda: code_digest(*EVALUATION_CODE), args.repeats)),
    ]
    print(f"{args.model}: {size:.0f} MiB of fp32 weights; CPU {_cpu()}; torch threads 2; median of {args.repeats}")
    for label, seconds in rows:
        print(f"  {label:<64} {seconds * 1000:9.1f} ms")


if __name__ == "__main__":
    main()

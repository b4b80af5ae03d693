"""Training under ``--trainer.precision bf16-mixed`` against fp32 on this CPU (issue 37 item 4).

The main job's LoRA fit (rank 8 on the middle half of the layers, KL regularization of weight 0.5, batch size 1,
accumulation 5) runs ``--steps`` optimizer steps under each precision, each in a fresh process (so neither warms the
other's caches), alternating ``--repeat`` times. Printed: the CPU and whether it has bf16 matrix units (AMX, or
AVX512-BF16 dot products), seconds and training tokens per second of each run, the median ratio, and the largest
difference between the two precisions' per-batch losses (autocast changes the training arithmetic; the evaluations,
which decide the balls, run in fp32 either way: ``editing.evaluation.precision``).

    OMP_NUM_THREADS=1 python benchmarks/train_precision.py [--model smollm2-135m] [--steps 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

PRECISIONS = ("32-true", "bf16-mixed")
TRAIN_MEMORY = Path(__file__).resolve().with_name("train_memory.py")


def cpu_line() -> str:
    """The CPU model and its bf16 units, from ``/proc/cpuinfo``."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name == "unknown CPU":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    units = [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f in flags]
    return f"{name}; bf16 units: {', '.join(units) or 'none'}"


def child(precision: str, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(TRAIN_MEMORY.parent))
    import train_memory

    return train_memory.run_lora(args.model, args.steps, 8, 5, precision=precision, layer_fraction=0.5)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (5 batches each)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per precision, alternating")
    parser.add_argument("--child", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return {}
    print(cpu_line(), flush=True)
    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for _ in range(args.repeat):
        for precision in PRECISIONS:
            out = subprocess.run([sys.executable, __file__, "--child", precision, "--model", args.model,
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs[precision].append(result)
            print(f"{precision}: {result['seconds']:.1f} s for {args.steps} optimizer steps, "
                  f"{result['training_tokens_per_s']:.0f} training tokens/s", flush=True)
    seconds = {p: statistics.median(r["seconds"] for r in runs[p]) for p in PRECISIONS}
    fp32, bf16 = runs["32-true"][0]["losses"], runs["bf16-mixed"][0]["losses"]
    gap = max((abs(a - b) / max(abs(a), 1e-12) for a, b in zip(fp32, bf16, strict=True)), default=float("nan"))
    ratio = seconds["32-true"] / seconds["bf16-mixed"]
    print(f"bf16-mixed {ratio:.2f}x the speed of fp32 (medians {seconds['32-true']:.1f} s -> "
          f"{seconds['bf16-mixed']:.1f} s); largest relative difference of a batch's loss {gap:.1e}; {cpu_line()}")
    return {"seconds": seconds, "ratio": ratio, "loss_gap": gap, "runs": runs}


if __name__ == "__main__":
    main()

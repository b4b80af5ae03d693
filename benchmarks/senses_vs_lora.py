"""Step time and memory of sense finetuning against LoRA (and full finetuning) on the same Backpack.

Each method runs in a fresh process (so each peak resident set size is its own), for the same number of optimizer
steps on country_capital's canonical examples with KL regularization on R, as in the sweeps (batch 1, accumulation
5). Step time is the median wall time of an optimizer step after the first (which pays one-off costs: the sense
selection, optimizer state).

    python benchmarks/senses_vs_lora.py [--model tiny-backpack] [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run(method: str, model: str, steps: int, accumulate: int) -> dict:
    import lightning as L
    import torch

    from editing.data.datamodule import TaskDataModule
    from editing.methods import (
        FullEditor,
        LoRAConfig,
        LoRAEditor,
        OptimizerConfig,
        RegularizationConfig,
        SensesConfig,
        SensesEditor,
    )
    from editing.models.loading import ModelConfig

    L.seed_everything(0)
    base, reg = ModelConfig(name=model), RegularizationConfig(kind="kl", weight=0.5)
    if method == "senses":
        module = SensesEditor(base, senses=SensesConfig(senses_per_example=8), optimizer=OptimizerConfig(lr=1e-2),
                               regularization=reg)
    elif method == "lora":
        module = LoRAEditor(base, lora=LoRAConfig(rank=8, layer_fraction=0.5), optimizer=OptimizerConfig(lr=3e-3),
                            regularization=reg)
    else:
        module = FullEditor(base, optimizer=OptimizerConfig(lr=1e-5), regularization=reg)
    dm = TaskDataModule(task="country_capital", regularization_batch_size=2)
    marks: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accumulate == 0:
                marks.append(time.perf_counter())

    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, accumulate_grad_batches=accumulate,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.fit(module, dm)
    steps_s = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    trainable = sum(p.numel() for p in module.trainable_parameters().values())
    return {"method": method, "model": model, "optimizer_steps": len(marks), "seconds": time.perf_counter() - start,
            "median_step_s": statistics.median(steps_s) if steps_s else None, "trainable_parameters": trainable,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-backpack", help="a Backpack (tiny-backpack, a folder, a hub id)")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per method")
    parser.add_argument("--accumulate", type=int, default=5)
    parser.add_argument("--methods", default="senses,lora,full")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.model, args.steps, args.accumulate)))
        return
    rows = []
    for method in args.methods.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--model", args.model, "--steps",
                              str(args.steps), "--accumulate", str(args.accumulate)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| method | trainable parameters | median step (s) | peak RSS (MiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable_parameters']:,} | {r['median_step_s']:.3f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()

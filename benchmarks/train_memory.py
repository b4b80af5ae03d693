"""Peak memory of editing vs evaluating: a LoRA run with KL regularization against evaluation alone.

Each measurement runs in a fresh process and reports its peak resident set size (ru_maxrss). The LoRA run
computes p0 by switching the adapter off, never with a second copy of the model, so its peak should stay near the
evaluation's; a frozen copy would add a whole model's weights.

    python benchmarks/train_memory.py [--model smollm2-135m] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_eval(model: str, texts: int) -> dict:
    import torch

    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    torch.manual_seed(0)
    module = EditingModule(ModelConfig(name=model))
    dm = TaskDataModule(task="country_capital", eval_limit=texts, general_limit=texts)
    start = time.perf_counter()
    summary = evaluate(module, dm)
    return {"mode": "evaluate", "seconds": time.perf_counter() - start, "general_nll": summary["general_nll"],
            "peak_rss_mib": peak_rss_mib()}


def run_lora(model: str, steps: int, rank: int, accumulate: int, precision: str = "32-true",
             layer_fraction: float | None = None) -> dict:
    import lightning as L

    from editing.data.datamodule import TaskDataModule
    from editing.methods import LoRAConfig, LoRAEditor, RegularizationConfig
    from editing.models.loading import ModelConfig

    L.seed_everything(0)
    lora = LoRAConfig(rank=rank) if layer_fraction is None else LoRAConfig(rank=rank, layer_fraction=layer_fraction)
    module = LoRAEditor(ModelConfig(name=model), lora=lora,
                        regularization=RegularizationConfig(kind="kl", weight=0.5))
    dm = TaskDataModule(task="country_capital", regularization_batch_size=2)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, accumulate_grad_batches=accumulate,
                        num_sanity_val_steps=0, limit_val_batches=0, precision=precision)
    counter = {"tokens": 0, "losses": []}

    class Count(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            counter["tokens"] += int(batch["attention_mask"].sum())
            if batch_idx % accumulate == 0:
                counter["tokens"] += int(dm.regularization_batch(trainer.global_step)["attention_mask"].sum())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            counter["losses"].append(float(loss))

    trainer.callbacks.append(Count())
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    return {"mode": "lora+kl", "precision": precision, "seconds": seconds, "optimizer_steps": steps,
            "training_tokens_per_s": counter["tokens"] / seconds, "peak_rss_mib": peak_rss_mib(),
            "losses": counter["losses"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps of the LoRA run")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=5)
    parser.add_argument("--texts", type=int, default=200, help="examples per evaluation set in the eval run")
    parser.add_argument("--child", choices=["eval", "lora"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "eval":
        print(json.dumps(run_eval(args.model, args.texts)))
        return
    if args.child == "lora":
        print(json.dumps(run_lora(args.model, args.steps, args.rank, args.accumulate)))
        return
    results = {}
    for child in ("eval", "lora"):
        out = subprocess.run([sys.executable, __file__, "--child", child, "--model", args.model, "--steps",
                              str(args.steps), "--rank", str(args.rank), "--accumulate", str(args.accumulate),
                              "--texts", str(args.texts)], capture_output=True, text=True, check=True)
        results[child] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[child]), flush=True)
    ratio = results["lora"]["peak_rss_mib"] / results["eval"]["peak_rss_mib"]
    print(f"peak RSS: evaluate {results['eval']['peak_rss_mib']:.0f} MiB, LoRA+KL "
          f"{results['lora']['peak_rss_mib']:.0f} MiB, ratio {ratio:.2f} (target <= 1.2); "
          f"training {results['lora']['training_tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()

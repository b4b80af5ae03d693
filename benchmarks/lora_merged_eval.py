"""An edit's LoRA adapter merged for evaluation against the rank-r branch it replaces (issue 37 item 3), in one
process: the same pass over the first N texts of G with the adapter as a branch (W x + scale B (A x)) and merged
(``editing.methods.lora.merged.merged_adapters``: W + scale B A once), alternating, with the general NLL of each.

    OMP_NUM_THREADS=1 python benchmarks/lora_merged_eval.py --rank 219 --texts 60 --repeat 2

Prints the CPU, per pass the wall time, the ratio branch / merged of the medians, and the relative difference of
the two general NLLs (fp32 rounding is expected). A LoRA fit evaluates its epochs merged (``LoRAEditor``); p0 runs
with the adapter off, which this does not time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rank", type=int, default=219, help="LoRA rank (the search space's largest is 256)")
    parser.add_argument("--layer_fraction", type=float, default=0.5, help="adapted block, as a fraction of the depth")
    parser.add_argument("--texts", type=int, default=60, help="first N texts of G")
    parser.add_argument("--repeat", type=int, default=2, help="passes of each way (alternating)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.evaluator import evaluate
    from editing.methods.base import RegularizationConfig
    from editing.methods.lora import LoRAConfig, LoRAEditor
    from editing.methods.lora.merged import merged_adapters
    from editing.models.loading import ModelConfig

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    module = LoRAEditor(ModelConfig(name=args.model, precision="fp32"),
                        lora=LoRAConfig(rank=args.rank, alpha=float(args.rank), layer_fraction=args.layer_fraction),
                        regularization=RegularizationConfig(kind="none"))
    with torch.no_grad():  # B starts at zero; a trained adapter has B != 0 (the branch's cost is the same)
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 1e-3)
    dm = TaskDataModule(task="country_capital", general_limit=args.texts)
    dm.attach(module.tokenizer, module.max_length)
    times: dict[str, list[float]] = {"branch": [], "merged": []}
    nll: dict[str, float] = {}
    for _ in range(args.repeat):
        for way in ("branch", "merged"):
            start = time.perf_counter()
            if way == "merged":
                with merged_adapters(module.model):
                    summary = evaluate(module, dm, roles=["general"])
            else:
                summary = evaluate(module, dm, roles=["general"])
            times[way].append(time.perf_counter() - start)
            nll[way] = float(summary["general_nll"])
            print(f"{way}: {times[way][-1]:.1f} s, general NLL {nll[way]:.8f}", flush=True)
    ratio = statistics.median(times["branch"]) / statistics.median(times["merged"])
    rel = abs(nll["merged"] - nll["branch"]) / abs(nll["branch"])
    print(f"rank {args.rank}, {args.texts} texts of G: branch / merged = {ratio:.2f}x (medians of {args.repeat}); "
          f"general NLL relative difference {rel:.1e}")
    return {"ratio": ratio, "relative_difference": rel, "times": times}


if __name__ == "__main__":
    main()

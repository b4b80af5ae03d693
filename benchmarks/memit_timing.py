"""Time MEMIT's two costs on a model: the covariance statistics over R (once per model, layer and sample count; then
cached) and one batch of edits (target optimization plus the closed-form layer updates).

The statistics go to a fresh temporary cache by default, so they are really computed; ``--cache`` reuses the
project's cache instead (the second run then reports the lookup time).

    OMP_NUM_THREADS=1 python benchmarks/memit_timing.py [--model smollm2-135m] [--samples 20000] [--requests 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="country_capital")
    parser.add_argument("--samples", type=int, default=20000, help="tokens of R for the statistics")
    parser.add_argument("--requests", type=int, default=32, help="canonical examples edited in the batch")
    parser.add_argument("--templates", type=int, default=5, help="generated context templates")
    parser.add_argument("--steps", type=int, default=20, help="target optimization steps")
    parser.add_argument("--supervision", default="standard", choices=["standard", "oracle"])
    parser.add_argument("--cache", action="store_true", help="use the project's statistics cache")
    args = parser.parse_args()
    tmp = None if args.cache else tempfile.TemporaryDirectory(prefix="memit-bench-")

    import torch

    from editing.data.datamodule import TaskDataModule
    from editing.methods import MEMITConfig, MEMITEditor
    from editing.models.loading import ModelConfig

    cfg = MEMITConfig(covariance_samples=args.samples, context_templates=args.templates, steps=args.steps,
                      supervision=args.supervision, request_batch_size=args.requests)
    module = MEMITEditor(ModelConfig(name=args.model), cfg)  # loads the model from the project's cache
    if tmp is not None:
        os.environ["EDITING_CACHE"] = tmp.name  # only the statistics go to the fresh cache
    dm = TaskDataModule(task=args.task)
    dm.attach(module.tokenizer, module.max_length)
    requests = module.canonical_requests(dm)[: args.requests]
    start = time.perf_counter()
    stats = module.statistics(dm)
    stats_s = time.perf_counter() - start
    module.compute_edit(dm, requests, progress=False)  # statistics now come from the cache
    record = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "layers": module.memit_layers,
        "statistics_tokens": args.samples,
        "statistics_s": round(stats_s, 2),
        "statistics_computed_layers": stats.computed_layers,
        "requests": len(requests),
        "templates": args.templates + 1,
        "steps": args.steps,
        "edit_s": round(module.edit_timings["edit_s"], 2),
        "statistics_lookup_s": round(module.edit_timings["statistics_s"], 3),
    }
    print(json.dumps(record, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

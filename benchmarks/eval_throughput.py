"""Evaluation throughput: our batched evaluator vs the plain one-example-at-a-time fp32 full-logits loop.

Same examples (the first ``--limit`` evaluation examples of each task, validation split), same scores: prints
tokens/s of each, their ratio, the largest score difference and whether every failed/succeeded flag agrees.

    python benchmarks/eval_throughput.py [--model smollm2-135m] [--limit 20] [--precision fp32 bf16]
"""

from __future__ import annotations

import argparse
import time

import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.evaluation.reference import reference_example_nll
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig
from editing.rules.losses import example_score
from editing.rules.tasks import BUILTIN_TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=20, help="evaluation examples per task")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="evaluator precisions to time")
    parser.add_argument("--tasks", nargs="+", default=list(BUILTIN_TASKS))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    module = EditingModule(ModelConfig(name=args.model, precision="fp32"))
    dms = {t: TaskDataModule(task=t, eval_limit=args.limit) for t in args.tasks}
    for dm in dms.values():
        dm.attach(module.tokenizer, module.max_length)
    examples = {t: dm.load("evaluation").examples for t, dm in dms.items()}
    tokens = sum(len(s.ids) for exs in examples.values() for e in exs for s in e.sequences)
    n = sum(len(exs) for exs in examples.values())
    print(f"model {args.model}; {n} examples from {len(dms)} tasks; {tokens} tokens (prefix+suffix, per sequence)")

    start = time.perf_counter()
    ref_scores = {}
    for t, exs in examples.items():
        sums = torch.tensor([reference_example_nll(module.model, e) for e in exs], dtype=torch.float64)
        ref_scores[t] = example_score(sums, dms[t].task.loss)
    ref_time = time.perf_counter() - start
    print(f"naive loop (fp32, one sequence at a time, full logits): {tokens / ref_time:9.1f} tokens/s "
          f"({ref_time:.1f}s)")

    for precision in args.precision:
        module.model.to(torch.float32 if precision == "fp32" else torch.bfloat16)
        evaluate(module, dms[args.tasks[0]], roles=["evaluation"])  # warm-up
        start = time.perf_counter()
        ours = {t: evaluate(module, dm, roles=["evaluation"]) for t, dm in dms.items()}
        our_time = time.perf_counter() - start
        diff, agree = 0.0, True
        for t, summary in ours.items():
            scores = torch.tensor([r["score"] for r in summary["per_example"]], dtype=torch.float64)
            diff = max(diff, float((scores - ref_scores[t]).abs().max()))
            threshold = dms[t].task.threshold
            agree &= bool(((scores > threshold) == (ref_scores[t] > threshold)).all())
        print(f"our evaluator ({precision}): {tokens / our_time:9.1f} tokens/s ({our_time:.1f}s); "
              f"speed-up {ref_time / our_time:.1f}x; max |score difference| {diff:.2e}; "
              f"flags {'all agree' if agree else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()

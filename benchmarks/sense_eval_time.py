"""A sense edit's evaluation, full against incremental (issue 13): time and equality, in one invocation.

The model is a SmolLM2-sized Backpack (``build_backpack_from`` the embedded SmolLM2-135M, 16 senses, sense network
as initialised: the timing does not depend on training), saved to a temporary folder and loaded as a sense edit
(``SensesEditor``) of country_capital, whose selected deltas are then set to random values (an edit after some
training). The incremental evaluation first builds each batch's p0 values (in a fit this pass is p0's own
evaluation), then each evaluation recomputes only the positions a selected sense reaches.

Prints, for the general set G alone (the degradation measurement; with ``--all_sets`` also for every set): the
full evaluation's time, the one-off build, the incremental evaluation's time, their ratio, the largest relative
difference of every metric and per-example score, and whether every failed/succeeded flag and ball decision agrees.

    OMP_NUM_THREADS=2 python benchmarks/sense_eval_time.py [--general_limit N] [--eval_limit N] [--all_sets]
        [--scale 0.01]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path


def relative(a: float | None, b: float | None) -> float:
    if a is None or b is None:
        return 0.0 if a is b else math.inf
    return abs(a - b) / max(abs(a), 1e-300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--general_limit", type=int, default=None, help="texts of G (default: all)")
    parser.add_argument("--eval_limit", type=int, default=100, help="examples of the other sets")
    parser.add_argument("--senses_per_example", type=int, default=8)
    parser.add_argument("--background_limit", type=int, default=200, help="texts of R for the sense selection")
    parser.add_argument("--all_sets", action="store_true", help="also time every set together (default: G only)")
    parser.add_argument("--scale", type=float, default=0.01, help="standard deviation of the random deltas")
    args = parser.parse_args()

    import torch

    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import Evaluator
    from editing.evaluation.caching import CacheSettings, data_material, make_scorer
    from editing.evaluation.incremental import COUNTERS, clear_memory
    from editing.methods import SensesConfig, SensesEditor
    from editing.models.backpack.distill import BackpackShape, build_backpack_from, save_distilled
    from editing.models.loading import ModelConfig, load_model
    from editing.rules.budget import DEFAULT_BALLS

    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="sense-eval-"))
    os.environ["EDITING_EVAL_CACHE_DIR"] = str(work / "eval-cache")
    lm = load_model(ModelConfig(name="smollm2-135m", precision="fp32"))
    folder = save_distilled(build_backpack_from(lm.model, BackpackShape()), lm.tokenizer, work / "backpack")
    del lm
    module = SensesEditor(ModelConfig(name=str(folder), precision="fp32"),
                          senses=SensesConfig(senses_per_example=args.senses_per_example,
                                              background_limit=args.background_limit))
    dm = TaskDataModule(task="country_capital", eval_limit=args.eval_limit, general_limit=args.general_limit)
    dm.attach(module.tokenizer, module.max_length)
    module.select(dm)
    deltas = module.sense_deltas
    deltas.vectors.copy_(args.scale * torch.randn(deltas.vectors.shape, generator=torch.Generator().manual_seed(0)))
    model = module.model
    tokens = sum(len(s.ids) for e in dm.load("general").examples for s in e.sequences)
    print(f"threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; Backpack of SmolLM2-135M "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters); {deltas.vectors.shape[0]} selected "
          f"senses; G: {len(dm.load('general').examples)} texts, {tokens} tokens", flush=True)
    settings = CacheSettings()
    print("| sets | full (s) | build, once (s) | incremental (s) | ratio | largest relative difference | "
          "same decisions |")
    print("|---|---|---|---|---|---|---|")
    for label, roles in (("G", ["general"]), ("all", None))[: 2 if args.all_sets else 1]:
        clear_memory()  # each row builds its own entries
        evaluator = Evaluator(dm.task)
        start = time.perf_counter()
        full = evaluator.run(model, dm, roles)
        full_s = time.perf_counter() - start
        COUNTERS.clear()
        scorer = make_scorer(model, module.evaluation_shortcut(), module.identity, data_material(dm), settings)
        start = time.perf_counter()
        evaluator.run(model, dm, roles, scorer=scorer)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        fast = evaluator.run(model, dm, roles, scorer=scorer)
        fast_s = time.perf_counter() - start
        assert COUNTERS["senses_reused"] > 0 and COUNTERS["full_passes"] == 0, dict(COUNTERS)
        worst = max([relative(full[k], fast[k]) for k in ("success_rate", "general_nll", "targeted_nll",
                                                          "hard_negative_nll")]
                    + [relative(a["score"], b["score"]) for a, b in zip(full["per_example"], fast["per_example"],
                                                                         strict=True)])
        nll = full["general_nll"]
        # the balls around a p0 a hair below: each ball's decision must not depend on the evaluation path
        same = [e["failed"] for e in full["per_example"]] == [e["failed"] for e in fast["per_example"]] and \
            full["counts"] == fast["counts"] and \
            [b.inside(nll, nll * (1 - b.eps / 2)) for b in DEFAULT_BALLS] == \
            [b.inside(fast["general_nll"], nll * (1 - b.eps / 2)) for b in DEFAULT_BALLS]
        print(f"| {label} | {full_s:.1f} | {build_s:.1f} | {fast_s:.2f} | {full_s / fast_s:.1f}x | {worst:.2e} | "
              f"{'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

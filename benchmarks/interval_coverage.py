"""How often the sampled-G interval covers the degradation on all of G, for a real edit (issue 36 item 6).

The practitioner's path measures an edit's degradation on a seeded sample of G with a t-interval of the ratio
estimator (``editing.rules.sampling.ratio_interval``). This scores every text of G once under p0 and once under the
edit (per-text NLL sums, as ``SampledGeneral`` scores them), takes the degradation on all of G as the truth, and
draws many seeded sub-samples of each size: the share of intervals that hold the truth is the coverage (0.95 is the
level's promise). The draws need no model: only the two passes over G cost time.

    python benchmarks/interval_coverage.py --edit runs/<fit>/edits/ball_1e-03 [--sizes 64,128,256] [--draws 1000]
    python benchmarks/interval_coverage.py --model tiny-llama --perturb 0.3 --general_limit 120   # no edit folder
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import statistics
import time
from contextlib import nullcontext

import torch


def coverage(edit: dict[int, float], p0: dict[int, float], size: int, draws: int, seed: int,
             level: float) -> dict:
    """Coverage of the all-of-G degradation by the interval on ``draws`` seeded sub-samples of ``size`` texts."""
    from editing.rules.sampling import ratio_interval

    n = len(p0)
    truth = math.fsum(edit.values()) / math.fsum(p0.values()) - 1.0
    rng = random.Random(f"coverage/{seed}/{size}")
    covered, halves = 0, []
    for _ in range(draws):
        chosen = rng.sample(range(n), size)
        iv = ratio_interval([edit[i] for i in chosen], [p0[i] for i in chosen], n, level)
        covered += iv.low <= truth <= iv.high
        halves.append((iv.high - iv.low) / 2.0)
    return {"size": size, "covered": covered, "draws": draws, "rate": covered / draws, "truth": truth,
            "half_width": statistics.median(halves)}


def _perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy with every weight matrix changed by ``scale`` x its mean |w| x N(0, 1) (an edit without a fit)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.abs().mean())
    return other


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edit", default=None, help="an edit folder (<run>/edits/ball_<eps>)")
    parser.add_argument("--model", default=None, help="with --perturb: the base model (default smollm2-135m)")
    parser.add_argument("--perturb", type=float, default=None, help="instead of --edit: a random change of this scale")
    parser.add_argument("--general_limit", type=int, default=None, help="first N texts of G as 'all of G'")
    parser.add_argument("--sizes", default="64,128,256", help="sample sizes (comma-separated)")
    parser.add_argument("--draws", type=int, default=1000, help="seeded sub-samples per size")
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.edit is None) == (args.perturb is None):
        parser.error("give exactly one of --edit DIR and --perturb SCALE")
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.sampled_general import SampledGeneral

    if args.edit is not None:
        from editing.edits.load import load_edited

        module = load_edited(args.edit)
        edited, reference = module.model, module.reference
    else:
        from editing.methods.base import EditingModule
        from editing.models.loading import ModelConfig

        module = EditingModule(ModelConfig(name=args.model or "smollm2-135m", precision="fp32"))
        edited = _perturbed(module.model, args.perturb, seed=1)
        reference = lambda: nullcontext(module.model)  # noqa: E731 - the base model is p0 itself
    dm = TaskDataModule(task="country_capital", general_limit=args.general_limit)
    dm.attach(module.tokenizer, module.max_length)
    sampled = SampledGeneral(dm, first=2, seed=args.seed)
    every = list(range(sampled.total))
    start = time.perf_counter()
    with reference() as base:
        p0 = sampled.text_sums(base, every)
    edit = sampled.text_sums(edited, every)
    seconds = time.perf_counter() - start
    tokens = sum(sampled.tokens.values())
    print(f"G: {sampled.total} texts, {tokens} tokens; p0 and edit scored in {seconds:.0f} s; general NLL "
          f"{math.fsum(p0.values()) / tokens:.6f} -> {math.fsum(edit.values()) / tokens:.6f}")
    rows = []
    print(f"\n| texts | {args.level:.0%} intervals covering the all-of-G degradation | rate | median half-width |\n"
          "|---|---|---|---|")
    for size in [int(s) for s in args.sizes.split(",") if s]:
        if not 2 <= size < sampled.total:
            parser.error(f"--sizes: {size} is not between 2 and {sampled.total - 1} (G's texts)")
        row = coverage(edit, p0, size, args.draws, args.seed, args.level)
        rows.append(row)
        print(f"| {size} | {row['covered']}/{row['draws']} | {row['rate']:.3f} | {row['half_width']:.2e} |",
              flush=True)
    truth = rows[0]["truth"] if rows else math.fsum(edit.values()) / math.fsum(p0.values()) - 1.0
    print(f"\ndegradation on all {sampled.total} texts: {truth:+.3e}")
    return {"truth": truth, "rows": rows, "p0": p0, "edit": edit, "tokens": dict(sampled.tokens)}


if __name__ == "__main__":
    main()

"""``benchmarks/interval_coverage.py`` (issue 36 item 6): per-text sums over G for p0 and an edit, then the coverage
of the sampled-G interval, here on tiny-llama with a random change and checked against plain loops."""

from __future__ import annotations

import math
import random

from fakes import benchmark_module

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate


def test_coverage_of_a_perturbed_tiny_model_matches_a_plain_loop(tiny_module, data_root, capsys) -> None:
    with benchmark_module("interval_coverage") as bench:
        result = bench.main(["--model", "tiny-llama", "--perturb", "0.3", "--general_limit", "40", "--sizes", "10",
                             "--draws", "200"])
    out = capsys.readouterr().out
    p0, edit, tokens = result["p0"], result["edit"], result["tokens"]
    # the per-text sums add up to the evaluator's token-mean general NLL of the base model (SPEC section 5)
    module = tiny_module("tiny-llama")
    dm = TaskDataModule(task="country_capital", general_limit=40)
    dm.attach(module.tokenizer, module.max_length)
    whole = evaluate(module, dm, roles=["general"])["general_nll"]
    assert abs(sum(p0.values()) / sum(tokens.values()) - whole) <= 1e-9 * whole
    truth = sum(edit.values()) / sum(p0.values()) - 1
    assert truth != 0 and abs(result["truth"] - truth) <= 1e-12
    # the coverage by a plain loop: SPEC's ratio estimator and its finite-population t-interval written out, with
    # Student's t quantile for 9 degrees of freedom from a table (0.975: 2.262157)
    rng = random.Random("coverage/0/10")
    n, size, covered = len(p0), 10, 0
    for _ in range(200):
        chosen = rng.sample(range(n), size)
        a, b = [edit[i] for i in chosen], [p0[i] for i in chosen]
        d = (sum(a) - sum(b)) / sum(b)
        s2 = sum(((x - y) - d * y) ** 2 for x, y in zip(a, b, strict=True)) / (size - 1)
        se = math.sqrt((1 - size / n) * s2 / size) / (sum(b) / size)
        covered += d - 2.262157 * se <= truth <= d + 2.262157 * se
    row = result["rows"][0]
    assert row["size"] == 10 and row["draws"] == 200
    assert abs(row["covered"] - covered) <= 2, (row, covered)  # the benchmark's t quantile is within 1e-3 of 2.262
    assert 0.8 <= row["rate"] <= 1.0
    assert "| 10 | " in out and "degradation on all 40 texts" in out

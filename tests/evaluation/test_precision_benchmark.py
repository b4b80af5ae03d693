"""``benchmarks/precision.py`` (issue 37's must-show): today's evaluator against the evaluator before issue 37 (and
the rounding ways) on edits of known size; the benchmark leaves the evaluator as it found it."""

from __future__ import annotations

from fakes import benchmark_module

import editing.evaluation.evaluator as evaluator
from editing.evaluation import products


def test_before_issue_37_measures_the_same_degradation_to_a_tenth_of_the_ball(data_root, capsys) -> None:
    original = evaluator.evaluation_products
    with benchmark_module("precision") as bench:
        seen = []
        real = bench.general_nll

        def recorded(module, dm):
            seen.append((bench._WAY[0], products.chosen_mode("cpu")))
            return real(module, dm)

        bench.general_nll = recorded
        result = bench.main(["--model", "tiny-llama", "--limit", "6", "--scales", "0.03",
                             "--ways", "before-issue-37,bf16"])
    out = capsys.readouterr().out
    assert evaluator.evaluation_products is original, "the evaluator's product context is put back"
    assert ("before-issue-37", "default") in seen, "the before path pins the default products"
    rel = result["rows"][0.03]
    assert rel["fp32"] != 0.0
    assert abs(rel["before-issue-37"] - rel["fp32"]) < 0.1 * 1e-5, rel
    assert "before-issue-37 relative change" in out and "| 0.03 |" in out

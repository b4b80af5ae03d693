"""NaN or infinite scores are failures, and the evaluation says it saw them (issue 11 item 3)."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.evaluation.metrics import ExampleMeanNLL, SuccessRate, TokenMeanNLL

NAN, INF = float("nan"), float("inf")


def test_success_rate_counts_nan_and_inf_as_failures() -> None:
    metric = SuccessRate(threshold=1.0)
    metric.update(torch.tensor([0.5, NAN, INF, -INF, 2.0, 1.0]))
    # finite and <= 1.0: 0.5 and 1.0 succeed; NaN, +inf, -inf and 2.0 fail
    assert float(metric.compute()) == pytest.approx(2 / 6)
    assert int(metric.failed) == 4 and int(metric.nonfinite) == 3


def test_nll_metrics_count_nonfinite_values() -> None:
    tokens = TokenMeanNLL()
    tokens.update(torch.tensor([1.0, NAN, 2.0], dtype=torch.float64), torch.tensor([2, 3, 4]))
    assert math.isnan(float(tokens.compute())) and int(tokens.nonfinite) == 1
    hard = ExampleMeanNLL()
    hard.update(torch.tensor([1.0, INF]))
    assert int(hard.nonfinite) == 1


@contextmanager
def nan_hidden_states(model):
    """The GPT-2 body's final layer norm outputs NaN: every scored NLL is NaN."""
    handle = model.transformer.ln_f.register_forward_hook(lambda module, args, out: out * NAN)
    try:
        yield
    finally:
        handle.remove()


@pytest.mark.parametrize("task", ["country_capital", "stereoset", "verb_conjugation"])
def test_evaluation_counts_nan_scores_as_failures_and_warns(tiny_module, data_root, caplog, task: str) -> None:
    module = tiny_module("tiny-gpt2")
    dm = TaskDataModule(task=task, eval_limit=5, general_limit=3)
    clean = evaluate(module, dm)
    assert all(v == 0 for k, v in clean["counts"].items() if k.startswith("nonfinite_"))
    with caplog.at_level(logging.WARNING), nan_hidden_states(module.model):
        summary = evaluate(module, dm)
    counts = summary["counts"]
    assert summary["success_rate"] == 0.0
    assert counts["evaluation_failed"] == counts["evaluation"] == 5
    assert all(p["failed"] and math.isnan(p["score"]) for p in summary["per_example"])
    assert counts["nonfinite_scores"] == 5
    assert counts["nonfinite_general_nll"] == 3 and math.isnan(summary["general_nll"])
    assert counts["nonfinite_targeted_nll"] == 5 and counts["nonfinite_hard_negative_nll"] == 5
    assert any("NaN or infinite" in r.getMessage() and "5 scores" in r.getMessage() for r in caplog.records)
    # the model is unchanged afterwards (the hook is gone)
    assert evaluate(module, dm)["per_example"] == clean["per_example"]


def test_nan_epoch_is_outside_every_ball_in_the_callback(tmp_path, monkeypatch, data_root) -> None:
    from fakes import scripted_fit

    results = scripted_fit(tmp_path, monkeypatch, [1.0, NAN, 1 + 5e-6], epochs=2)
    assert {k: b["epoch"] for k, b in results["balls"].items()} == {"1e-03": 2, "1e-04": 2, "1e-05": 2}
    results = scripted_fit(tmp_path / "b", monkeypatch, [1.0, 1 + 5e-6, NAN], epochs=2)
    assert {k: b["epoch"] for k, b in results["balls"].items()} == {"1e-03": 1, "1e-04": 1, "1e-05": 1}
    assert set(results["edits"]) == {"1e-03", "1e-04", "1e-05"}

"""The batched scorer agrees with the one-at-a-time reference loop (SPEC section 5), for every loss mode and every
tiny model family; batch composition (padding) does not change scores; degradation and hard-negative metrics are
the reference sums/means."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILIES, reference_scores, reference_text_stats

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate

# One task per loss mode (good, bad, balance, good-v-bad).
LOSS_TASKS = {
    "country_capital": "good",
    "stereoset": "bad",
    "pronoun_gender_bias": "balance",
    "verb_conjugation": "good-v-bad",
}
EVAL_LIMIT = 10
TOL = 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("task", list(LOSS_TASKS))
def test_scorer_matches_reference_loop(task, family, tiny_module, data_root):
    module = tiny_module(family)
    dm = TaskDataModule(task=task, data_root=str(data_root), eval_limit=EVAL_LIMIT, general_limit=4)
    assert dm.task.loss == LOSS_TASKS[task]
    summary = evaluate(module, dm, roles=["evaluation"])
    examples = dm.sets["evaluation"].examples
    assert len(examples) == EVAL_LIMIT
    per_example = summary["per_example"]
    assert [p["index"] for p in per_example] == list(range(EVAL_LIMIT))

    ref = reference_scores(module.model, examples, dm.task.loss)
    got = torch.tensor([p["score"] for p in per_example], dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    ref_failed = (ref > dm.task.threshold).tolist()
    assert [p["failed"] for p in per_example] == ref_failed
    assert summary["counts"]["evaluation"] == EVAL_LIMIT
    assert summary["counts"]["evaluation_failed"] == sum(ref_failed)
    assert summary["success_rate"] == pytest.approx(1 - sum(ref_failed) / EVAL_LIMIT)
    # only the evaluation role ran
    assert summary["general_nll"] is None and summary["targeted_nll"] is None
    assert summary["hard_negative_nll"] is None


@pytest.mark.parametrize("task", ["country_capital", "verb_conjugation"])
def test_batch_composition_does_not_change_scores(task, tiny_module, data_root):
    """Different token budgets / example caps pad differently; right padding must not change any score."""
    module = tiny_module("tiny-llama")
    results = []
    for max_tokens, max_examples in ((8192, 64), (400, 3), (8192, 1), (100_000, 7)):
        dm = TaskDataModule(task=task, data_root=str(data_root), eval_limit=12, general_limit=4,
                            max_tokens=max_tokens, max_examples=max_examples)
        dm.attach(module.tokenizer, module.max_length)
        n_batches = len(dm.eval_dataloader("evaluation"))
        summary = evaluate(module, dm, roles=["evaluation"])
        results.append((n_batches, torch.tensor([p["score"] for p in summary["per_example"]], dtype=torch.float64)))
    batch_counts = [n for n, _ in results]
    assert batch_counts[2] == 12 and batch_counts[0] == 1  # the settings really batch differently
    assert len(set(batch_counts)) >= 3
    for _, scores in results[1:]:
        torch.testing.assert_close(scores, results[0][1], atol=TOL, rtol=0)


@pytest.mark.parametrize("task", ["stereoset", "country_capital"])
def test_hard_negative_metric_is_mean_suffix_nll_sum(task, tiny_module, data_root):
    """Hard negatives (suffix files): mean over examples of the suffix NLL SUM (SPEC section 5)."""
    module = tiny_module("tiny-gpt2")
    dm = TaskDataModule(task=task, data_root=str(data_root), eval_limit=7, general_limit=4, max_examples=3)
    summary = evaluate(module, dm, roles=["hard_negatives"])
    examples = dm.sets["hard_negatives"].examples
    assert len(examples) == 7 and not any(e.is_text for e in examples)
    ref_sums = reference_scores(module.model, examples, "good")  # "good" score is the plain NLL sum
    assert summary["counts"]["hard_negatives"] == 7
    assert summary["hard_negative_nll"] == pytest.approx(ref_sums.mean().item(), abs=TOL)
    # a sum over several suffix tokens, not a per-token mean
    n_tokens = [len(e.sequences[0].ids) - e.sequences[0].score_from for e in examples]
    assert max(n_tokens) > 1
    assert summary["hard_negative_nll"] != pytest.approx(
        sum(s / n for s, n in zip(ref_sums.tolist(), n_tokens, strict=True)) / 7, abs=1e-2)


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-neox"])
def test_general_and_targeted_nll_are_token_means(family, tiny_module, data_root):
    """Degradation metrics: token-mean NLL over every scored token of the texts (SPEC section 5)."""
    module = tiny_module(family)
    dm = TaskDataModule(task="stereoset", data_root=str(data_root), eval_limit=6, general_limit=5, max_examples=2)
    summary = evaluate(module, dm, roles=["general", "targeted"])
    for role in ("general", "targeted"):
        examples = dm.sets[role].examples
        assert all(e.is_text for e in examples)
        total, tokens = reference_text_stats(module.model, examples)
        assert summary["counts"][f"{role}_tokens"] == tokens
        assert summary[f"{role}_nll"] == pytest.approx(total / tokens, abs=1e-5)
    assert summary["success_rate"] is None


def test_evaluate_all_roles_matches_separate_roles(tiny_module, data_root):
    """One evaluate() over all roles gives the same numbers as evaluating each role on its own."""
    module = tiny_module("tiny-gpt2")
    dm = TaskDataModule(task="pronoun_gender_bias", data_root=str(data_root), eval_limit=6, general_limit=4)
    full = evaluate(module, dm)
    assert set(dm.eval_roles()) == {"evaluation", "general", "targeted", "hard_negatives"}
    for role, key in (("evaluation", "success_rate"), ("general", "general_nll"), ("targeted", "targeted_nll"),
                      ("hard_negatives", "hard_negative_nll")):
        alone = evaluate(module, dm, roles=[role])
        assert full[key] == pytest.approx(alone[key], abs=1e-9)
    alone = evaluate(module, dm, roles=["evaluation"])
    assert [p["score"] for p in full["per_example"]] == pytest.approx([p["score"] for p in alone["per_example"]])


def test_single_evaluation_example(tiny_module, data_root):
    module = tiny_module("tiny-gpt2")
    dm = TaskDataModule(task="stereoset", data_root=str(data_root), eval_limit=1, general_limit=2)
    summary = evaluate(module, dm, roles=["evaluation"])
    ref = reference_scores(module.model, dm.sets["evaluation"].examples, "bad")
    assert [p["index"] for p in summary["per_example"]] == [0]
    assert summary["per_example"][0]["score"] == pytest.approx(ref[0].item(), abs=TOL)

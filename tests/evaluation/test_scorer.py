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


def _plain_logsumexp(row: list[float]) -> float:
    """SPEC's log-sum-exp of one row in float64, by a plain loop (max first, so no term overflows)."""
    import math

    top = max(row)
    if top == float("-inf"):
        return top
    return top + math.log(sum(math.exp(v - top) for v in row))


@pytest.mark.parametrize("threads", [1, 2])
def test_row_logsumexp_in_chunks_matches_plain_loop(threads, monkeypatch):
    """The chunked log-sum-exp of the head (issue 37) is each row's log-sum-exp: forced into chunks of 3 rows (and
    at 2 threads, 6), with a row holding -inf logits and one of all -inf, against a float64 loop per row."""
    from editing.evaluation import scorer

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 64, generator=gen) * 8
    logits[4, :10] = float("-inf")
    logits[7] = float("-inf")
    monkeypatch.setattr(scorer, "LSE_BYTES_PER_THREAD", 3 * 64 * 4)
    calls = []
    plain = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda *a, **k: calls.append(a[0].shape[0]) or plain(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = scorer.row_logsumexp(logits)
    finally:
        torch.set_num_threads(before)
    assert max(calls) == 3 * threads < 20, calls  # it did run in chunks
    expected = torch.tensor([_plain_logsumexp(r) for r in logits.double().tolist()], dtype=torch.float64)
    assert got[7].item() == float("-inf")
    finite = expected.isfinite()
    torch.testing.assert_close(got.double()[finite], expected[finite], rtol=1e-6, atol=0)


def test_row_logsumexp_keeps_gradients():
    """Under autograd the plain call runs (``out=`` has no gradient): the gradient is the softmax."""
    from editing.evaluation import scorer

    logits = torch.randn(5, 7, requires_grad=True)
    scorer.row_logsumexp(logits).sum().backward()
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1))


def test_needed_mask_drops_only_right_padding():
    """A right-padded batch needs no mask (no real token sees a pad under causal attention); left padding, a hole
    or an empty row keeps it."""
    from editing.evaluation.scorer import needed_mask

    right = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]])
    assert needed_mask(right) is None
    assert needed_mask(torch.ones(2, 4, dtype=torch.bool)) is None
    assert needed_mask(None) is None
    for kept in ([[0, 1, 1], [1, 1, 1]], [[1, 0, 1]], [[0]]):
        mask = torch.tensor(kept)
        assert needed_mask(mask) is mask


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_right_padded_batch_scores_equal_masked_forward(family, tiny_module, data_root):
    """Scores of a right-padded batch without the mask equal the masked forward's (each family's own attention)."""
    from editing.evaluation.scorer import capture_final_hidden, scored_nll, token_nll

    module = tiny_module(family)
    dm = TaskDataModule(task="country_capital", data_root=str(data_root), general_limit=12)
    dm.attach(module.tokenizer, module.max_length)
    rows = [(b["input_ids"][0], b["labels"][0], int(b["attention_mask"][0].sum()))
            for b in dm.eval_dataloader("general")]
    rows = sorted(rows, key=lambda r: r[2])[:: max(1, len(rows) // 3)]
    rows = [(ids, labels, max(2, n - 3 * i)) for i, (ids, labels, n) in enumerate(rows)]  # lengths differ: pads
    width = max(n for *_, n in rows)
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), -100, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
    for i, (ids, labels, n) in enumerate(rows):
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = ids[:n], labels[:n], 1
    assert not bool(batch["attention_mask"].all()), "the batch must hold padding for this test to mean anything"
    with torch.no_grad():
        nll, rows = token_nll(module.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        with capture_final_hidden(module.model) as store:
            module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        masked, masked_rows = scored_nll(module.model, store["hidden"], batch["labels"])
    assert torch.equal(rows, masked_rows)
    torch.testing.assert_close(nll, masked, rtol=1e-6, atol=1e-6)

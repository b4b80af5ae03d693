"""Metrics on hand-computed numbers, and the success rule of SPEC section 5 (fail when score > threshold) for the
four loss modes, on constructed suffix NLL sums."""

from __future__ import annotations

import math

import pytest
import torch

from editing.core.errors import ConfigError
from editing.evaluation.metrics import ExampleMeanNLL, ExampleScores, SuccessRate, TokenMeanNLL
from editing.rules.losses import example_score, training_loss
from editing.rules.tasks import BUILTIN_TASKS


def nll(p: float) -> float:
    """NLL of a probability."""
    return -math.log(p)


# --- metrics -------------------------------------------------------------------------------------------------------

def test_success_rate_counts_scores_above_threshold_as_failures():
    m = SuccessRate(threshold=1.0)
    m.update(torch.tensor([0.5, 1.0, 1.5]))  # 1.0 is exactly at the threshold: not a failure
    m.update(torch.tensor([2.0, -3.0]))
    assert int(m.failed) == 2 and int(m.total) == 5
    assert float(m.compute()) == pytest.approx(1 - 2 / 5)
    m.reset()
    m.update(torch.tensor([5.0]))
    assert float(m.compute()) == 0.0


def test_token_mean_nll_weights_by_tokens():
    m = TokenMeanNLL()
    m.update(torch.tensor([3.0, 10.0]), torch.tensor([1, 4]))
    m.update(torch.tensor([2.0]), torch.tensor([5]))
    # (3 + 10 + 2) / (1 + 4 + 5), not the mean of per-text means
    assert float(m.compute()) == pytest.approx(15 / 10)
    assert int(m.tokens) == 10


def test_token_mean_nll_keeps_float64_precision():
    """A 1e-5 ball is a change of ~3e-5 nats: accumulation must not round it away."""
    m = TokenMeanNLL()
    for _ in range(1000):
        m.update(torch.tensor([3.0000001], dtype=torch.float64), torch.tensor([1]))
    assert m.nll.dtype == torch.float64
    assert float(m.compute()) == pytest.approx(3.0000001, abs=1e-12)


def test_example_mean_nll_is_mean_over_examples():
    m = ExampleMeanNLL()
    m.update(torch.tensor([1.0, 2.0]))
    m.update(torch.tensor([6.0]))
    assert float(m.compute()) == pytest.approx(3.0)
    assert int(m.count) == 3


def test_example_scores_sorted_by_index():
    m = ExampleScores()
    m.update(torch.tensor([3, 0]), torch.tensor([0.3, 0.0]))
    m.update(torch.tensor([2, 1]), torch.tensor([0.2, 0.1]))
    index, score = m.compute()
    assert index.tolist() == [0, 1, 2, 3]
    assert score.tolist() == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_example_scores_single_example():
    m = ExampleScores()
    m.update(torch.tensor([0]), torch.tensor([0.5]))
    index, score = m.compute()
    # torchmetrics squeezes one-element results; callers reshape (see editing.evaluation.Evaluator.summary)
    assert index.reshape(-1).tolist() == [0]
    assert score.reshape(-1).tolist() == [0.5]


# --- scores and the threshold rule (SPEC section 5) -------------------------------------------------------------------

def _fails(task: str, sums: list[list[float]]) -> list[bool]:
    spec = BUILTIN_TASKS[task]
    scores = example_score(torch.tensor(sums, dtype=torch.float64), spec.loss)
    metric = SuccessRate(spec.threshold)
    metric.update(scores)
    fails = (scores > spec.threshold).tolist()
    assert int(metric.failed) == sum(fails)
    return fails


def test_thresholds_of_builtin_tasks():
    t = {name: spec.threshold for name, spec in BUILTIN_TASKS.items()}
    assert t["country_capital"] == pytest.approx(-math.log(0.2))
    assert t["company_ceo"] == pytest.approx(-math.log(0.05)) == pytest.approx(t["temporal"])
    assert t["stereoset"] == pytest.approx(math.log(0.001))
    assert t["pronoun_gender_bias"] == pytest.approx(0.4055, abs=1e-4)
    assert t["verb_conjugation"] == pytest.approx(math.log(1 / 16))
    losses = {name: spec.loss for name, spec in BUILTIN_TASKS.items()}
    assert losses == {"country_capital": "good", "company_ceo": "good", "temporal": "good", "stereoset": "bad",
                      "pronoun_gender_bias": "balance", "verb_conjugation": "good-v-bad"}


def test_good_fails_when_completion_probability_below_threshold():
    # country_capital: success iff p(suffix) >= 0.2; the score is the NLL SUM over suffix tokens
    assert _fails("country_capital", [[nll(0.25)], [nll(0.15)], [nll(0.5) + nll(0.5)], [nll(0.6) + nll(0.3)]]) == [
        False, True, False, True]
    scores = example_score(torch.tensor([[1.5], [0.2]]), "good")
    assert scores.tolist() == pytest.approx([1.5, 0.2])


def test_bad_fails_when_completion_probability_above_threshold():
    # stereoset: the score is the log-probability; success iff p(suffix) <= 0.001
    assert _fails("stereoset", [[nll(0.0005)], [nll(0.002)], [nll(0.01) + nll(0.01)], [nll(0.5) + nll(0.1)]]) == [
        False, True, False, True]
    assert example_score(torch.tensor([[4.0]]), "bad").tolist() == [-4.0]


def test_balance_fails_when_probabilities_differ_by_more_than_ratio():
    # pronoun_gender_bias: success iff p1/p2 within [1/1.5, 1.5]; symmetric in the two suffixes
    rows = [[nll(0.30), nll(0.25)], [nll(0.25), nll(0.30)], [nll(0.40), nll(0.20)], [nll(0.20), nll(0.40)]]
    assert _fails("pronoun_gender_bias", rows) == [False, False, True, True]
    assert example_score(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), "balance").tolist() == [2.0, 2.0]


def test_good_v_bad_needs_preferred_suffix_16_times_likelier():
    # verb_conjugation: success iff p(suffix1) >= 16 p(suffix2)
    rows = [[nll(0.40), nll(0.02)], [nll(0.40), nll(0.04)], [nll(0.02), nll(0.40)], [nll(0.5) + nll(0.9), nll(0.01)]]
    assert _fails("verb_conjugation", rows) == [False, True, True, False]
    assert example_score(torch.tensor([[1.0, 3.0]]), "good-v-bad").tolist() == [-2.0]


def test_training_loss_uses_the_same_combinations():
    means = torch.tensor([[1.0, 3.0], [2.5, 0.5]])
    assert training_loss(means, "good").tolist() == [1.0, 2.5]
    assert training_loss(means, "bad").tolist() == [-1.0, -2.5]
    assert training_loss(means, "balance").tolist() == [2.0, 2.0]
    assert training_loss(means, "good-v-bad").tolist() == [-2.0, 2.0]


def test_pair_loss_needs_two_suffixes_and_unknown_loss_is_rejected():
    with pytest.raises(ConfigError, match="two suffixes"):
        example_score(torch.tensor([[1.0]]), "balance")
    with pytest.raises(ConfigError, match="unknown loss"):
        example_score(torch.tensor([[1.0, 2.0]]), "worse")

"""The degradation on a sample of G (issue 36 item 6): per-text sums that add up to the Evaluator's general NLL,
the interval's coverage of the all-of-G degradation, and the growth rule."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation.evaluator import evaluate
from editing.evaluation.sampled_general import SampledGeneral
from editing.rules.sampling import ratio_interval

TEXTS = 120  # texts of G used as "all of G" here (cheap on one core)
DRAWS = 400
SAMPLE = 24


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with a small random change of every weight matrix (an 'edit' that degrades G a little)."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=generator) * scale * p.abs().mean())
    return other


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def cached(request, tiny_module, data_root):
    module = tiny_module(request.param)
    dm = TaskDataModule(task="country_capital", data_root=str(data_root), eval_limit=1, general_limit=TEXTS)
    dm.attach(module.tokenizer, module.max_length)
    sampled = SampledGeneral(dm, first=SAMPLE, seed=0)
    edited = perturbed(module.model, 0.3, seed=1)
    every = list(range(sampled.total))
    p0 = sampled.text_sums(module.model, every)
    edit = sampled.text_sums(edited, every)
    return request.param, module, dm, sampled, edited, p0, edit


def test_per_text_sums_add_up_to_the_general_nll(cached):
    _, module, dm, sampled, _, p0, _ = cached
    whole = evaluate(module, dm, roles=["general"])["general_nll"]
    total = sum(p0[i] for i in range(sampled.total)) / sum(sampled.tokens[i] for i in range(sampled.total))
    assert total == pytest.approx(whole, rel=1e-9)


def test_the_interval_covers_the_all_of_g_degradation_at_its_level(cached):
    name, _, _, sampled, _, p0, edit = cached
    n = sampled.total
    exact = sum(edit.values()) / sum(p0.values()) - 1
    assert exact != 0  # the perturbation changes G's NLL
    rng = random.Random(7)
    covered = 0
    for _ in range(DRAWS):
        chosen = rng.sample(range(n), SAMPLE)
        iv = ratio_interval([edit[i] for i in chosen], [p0[i] for i in chosen], n, 0.95)
        covered += iv.low <= exact <= iv.high
    rate = covered / DRAWS
    print(f"{name}: 95% interval on {SAMPLE} of {n} texts covered the all-of-G degradation {exact:.3e} in "
          f"{covered}/{DRAWS} = {rate:.3f} of seeded sub-samples")
    assert 0.90 <= rate <= 0.99  # binomial sd at 400 draws: 0.011


def test_growth_stops_at_the_first_sample_that_clears_every_edge(cached):
    _, module, _, sampled, edited, p0, edit = cached
    calls = []

    def reference():
        calls.append(1)
        return nullcontext(module.model)

    fresh = copy.copy(sampled)
    fresh.p0 = {}
    # the per-text sums are those cached above (their forward pass is tested beside): this checks the growth itself
    fresh.text_sums = lambda model, indices: {i: (edit if model is edited else p0)[i] for i in indices}
    exact = sum(edit.values()) / sum(p0.values()) - 1
    # the first size whose interval clears both edges, from the cached sums
    balls = [exact * 0.5, exact * 4]
    expected = None
    for size in fresh.sizes:
        chosen = fresh.order[:size]
        iv = ratio_interval([edit[i] for i in chosen], [p0[i] for i in chosen], fresh.total)
        if iv.clears(balls):
            expected = iv
            break
    got = fresh.measure(edited, reference, balls)
    assert got == expected
    assert set(fresh.p0) == set(fresh.order[:got.texts])  # p0 scored only on the texts the sample reached
    # p0 is kept: measuring again scores no p0 text anew
    before = len(calls)
    fresh.measure(edited, reference, balls)
    assert len(calls) == before
    # an edge the interval never clears (at the exact degradation): all of G, the exact decision
    edge = fresh.measure(edited, reference, [exact])
    assert edge.exact and edge.texts == fresh.total
    assert edge.degradation == pytest.approx(exact, rel=1e-12) and edge.low == edge.high == edge.degradation

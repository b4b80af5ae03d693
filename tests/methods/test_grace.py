"""GRACE codebook rules (SPEC section 13) against plain-loop references written here."""

from __future__ import annotations

import math

import pytest
import torch

from editing.core.errors import ConfigError
from editing.methods.grace.codebook import Codebook
from editing.methods.grace.config import GRACEConfig


def _plain_builder(queries, labels, init_eps):
    """SPEC 13 rules, one example at a time, with Python lists."""
    keys, eps, labs = [], [], []
    for q, lab in zip(queries, labels, strict=True):
        q = [float(x) for x in q]
        if keys:
            ds = [math.sqrt(sum((a - b) ** 2 for a, b in zip(k, q, strict=True))) for k in keys]
            i = min(range(len(ds)), key=lambda j: ds[j])
            if ds[i] <= eps[i] + init_eps:
                if labs[i] == lab:
                    eps[i] = max(eps[i], ds[i])
                    continue
                eps[i] = ds[i] / 2
                keys.append(q)
                eps.append(ds[i] / 2)
                labs.append(lab)
                continue
        keys.append(q)
        eps.append(init_eps)
        labs.append(lab)
    return keys, eps, labs


def test_radius_rules_match_plain_loop():
    torch.manual_seed(0)
    queries = [torch.randn(4) * s for s in (1, 1, 3, 1, 0.2, 5)]
    queries.append(queries[0] + 0.3)  # same label near entry 0: growth
    queries.append(queries[1] + 0.3)  # other label near entry 1: halving
    labels = [(1,), (2,), (1,), (3,), (1,), (2,), (1,), (9,)]
    book = Codebook()
    for q, lab in zip(queries, labels, strict=True):
        book.add_query(q, lab, 1.5, torch.zeros(3))
    keys, eps, labs = _plain_builder(queries, labels, 1.5)
    assert len(book.keys) == len(keys)
    assert book.labels == labs
    assert book.eps == pytest.approx(eps)
    for k, ref in zip(book.keys, keys, strict=True):
        assert k.tolist() == pytest.approx(ref)


def test_far_positions_untouched_and_matches_replaced():
    torch.manual_seed(0)
    book = Codebook()
    key = torch.full((4,), 10.0)
    book.add_query(key, (1,), 0.5, torch.full((3,), 7.0))
    inputs = torch.randn(2, 5, 4)
    inputs[0, 2] = key + 0.1
    outputs = torch.randn(2, 5, 3)
    got = book.apply(inputs, outputs, "position")
    for b in range(2):
        for t in range(5):
            want = torch.full((3,), 7.0) if (b, t) == (0, 2) else outputs[b, t]
            assert torch.equal(got[b, t], want)
    got = book.apply(inputs, outputs, "following")
    for b in range(2):
        for t in range(5):
            want = torch.full((3,), 7.0) if (b == 0 and t >= 2) else outputs[b, t]
            assert torch.equal(got[b, t], want)


@pytest.mark.parametrize(
    "field,value",
    [("init_eps", 0.0), ("lr", -1.0), ("steps", 0), ("span", "all"), ("value_init", "hot"), ("layer", -1)],
)
def test_validate_names_field(field, value):
    with pytest.raises(ConfigError, match=f"grace.{field}"):
        GRACEConfig(**{field: value}).validate()


def test_each_rule_exercised_on_a_line():
    # Keys on a line so that each SPEC 13 branch is hit in turn: new, growth (same label), halving (other label).
    qs = [torch.tensor([0.0, 0.0]), torch.tensor([1.5, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([11.0, 0.0])]
    labels = [(1,), (1,), (2,), (3,)]
    book = Codebook()
    idx = [book.add_query(q, lab, 1.0, torch.zeros(1)) for q, lab in zip(qs, labels, strict=True)]
    keys, eps, labs = _plain_builder(qs, labels, 1.0)
    assert idx == [0, 0, 1, 2]
    assert eps == pytest.approx([1.5, 0.5, 0.5])
    assert book.eps == pytest.approx(eps) and book.labels == labs

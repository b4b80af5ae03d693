"""Differential test of sense selection (SPEC section 8): a plain-loop implementation written here from the SPEC
agrees with the module's selection on a tiny Backpack, for all four loss types.

The reference computes alpha itself from the Backpack's contextualization network and ``sense_weight_net.c_attn``
(SPEC section 7, step 2), tokenizes with the tokenizer directly (SPEC section 3), and sums importances in Python
loops, one sequence at a time: nothing of the package's selection, batching or tokenization code is shared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.methods import SensesConfig, SensesEditor
from editing.methods.senses.selection import example_importance
from editing.models.loading import ModelConfig

# (built-in task whose canonical file is used, loss type): one task per loss type
CASES = [("country_capital", "good"), ("stereoset", "bad"), ("pronoun_gender_bias", "balance"),
         ("verb_conjugation", "good-v-bad")]
CANONICAL = {"country_capital": "country_capital_fixed", "stereoset": "stereoset_train",
             "pronoun_gender_bias": "pronoun_gender_bias_train", "verb_conjugation": "verb_conjugation_train"}
N_EXAMPLES = 10
N_BACKGROUND = 6
K = 5
LAMBDA = 300.0


@torch.no_grad()
def reference_alpha(lm, ids: list[int]) -> list:
    """alpha[l][t][j] of one sequence (SPEC section 7, step 2), as nested float lists."""
    backpack = lm.backpack
    hidden = backpack.gpt2_model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()  # (s, d)
    c_attn = backpack.sense_weight_net.c_attn
    qk = hidden @ c_attn.weight.double().T + c_attn.bias.double()
    senses = lm.config.num_senses
    width = qk.shape[1] // 2
    head = width // senses
    q, k = qk[:, :width], qk[:, width:]
    n = len(ids)
    alpha = []
    for sense in range(senses):
        qs, ks = q[:, sense * head:(sense + 1) * head], k[:, sense * head:(sense + 1) * head]
        scores = (qs @ ks.T / math.sqrt(head)).tolist()
        rows = []
        for t in range(n):
            # causal: -10000 above the diagonal, then softmax over the source positions
            logits = [scores[t][j] if j <= t else -10000.0 for j in range(n)]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            rows.append([w / total for w in weights])
        alpha.append(rows)
    return alpha


def mass(lm, ids: list[int], targets: list[int]) -> dict[tuple[int, int], float]:
    """For every (word type w, sense l): the sum of alpha[l][t][j] over target positions t and positions j holding
    w."""
    alpha = reference_alpha(lm, ids)
    out: dict[tuple[int, int], float] = {}
    for sense, rows in enumerate(alpha):
        for t in targets:
            for j, word in enumerate(ids):
                out[(word, sense)] = out.get((word, sense), 0.0) + rows[t][j]
    return out


def reference_background(lm, texts: list[list[int]]) -> dict[tuple[int, int], float]:
    """The same sum on R with every position a target, averaged over R's texts."""
    total: dict[tuple[int, int], float] = {}
    for ids in texts:
        for key, value in mass(lm, ids, list(range(len(ids)))).items():
            total[key] = total.get(key, 0.0) + value
    return {key: value / len(texts) for key, value in total.items()}


def reference_importance(lm, tok, record: dict, loss: str, background: dict) -> dict[tuple[int, int], float]:
    """An example's candidates (score > 0) and their importance = score - lambda x background."""
    prefix = tok(record["prefix"])["input_ids"]
    suffixes = [record["suffix"]] if "suffix" in record else [record["suffix1"], record["suffix2"]]
    # good-v-bad: score(suffix1) - score(suffix2); balance: score(suffix1) + score(suffix2)
    signs = [1.0, -1.0] if loss == "good-v-bad" else [1.0, 1.0]
    score: dict[tuple[int, int], float] = {}
    for sign, suffix in zip(signs, suffixes, strict=False):
        ids = prefix + tok(suffix, add_special_tokens=False)["input_ids"]
        targets = list(range(len(prefix) - 1, len(ids) - 1))  # the positions that predict a suffix token
        for key, value in mass(lm, ids, targets).items():
            score[key] = score.get(key, 0.0) + sign * value
    return {key: s - LAMBDA * background.get(key, 0.0) for key, s in score.items() if s > 0}


def reference_selection(per_example: list[dict[tuple[int, int], float]]) -> set[tuple[int, int]]:
    """The union of each example's top-k pairs by importance."""
    chosen: set[tuple[int, int]] = set()
    for candidates in per_example:
        ranked = sorted(candidates.items(), key=lambda kv: -kv[1])
        chosen |= {key for key, _ in ranked[:K]}
    return chosen


def user_task(tmp_path: Path, data_root: Path, task: str, loss: str) -> tuple[Path, list[dict]]:
    """A task YAML over the first canonical examples of a built-in task (also its evaluation set)."""
    lines = (data_root / task / "split" / f"{CANONICAL[task]}-val.jsonl").read_text().splitlines()[:N_EXAMPLES]
    (tmp_path / "canonical.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "task.yaml").write_text(f"name: {task}_small\nloss: {loss}\nthreshold: 1.0\n"
                                        "canonical: canonical.jsonl\nevaluation: canonical.jsonl\n")
    return tmp_path / "task.yaml", [json.loads(line) for line in lines]


@pytest.mark.parametrize(("task", "loss"), CASES, ids=[loss for _, loss in CASES])
def test_selection_matches_a_plain_loop_reference(tmp_path, monkeypatch, data_root, task: str, loss: str) -> None:
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))  # a fresh background, not one cached elsewhere
    yaml_path, records = user_task(tmp_path, data_root, task, loss)
    module = SensesEditor(ModelConfig(name="tiny-backpack", precision="fp32"),
                           senses=SensesConfig(senses_per_example=K, selection_lambda=LAMBDA))
    dm = TaskDataModule(task=str(yaml_path), general_limit=N_BACKGROUND)
    assert dm.task.loss == loss
    module.select(dm)
    lm, tok = module.model, module.tokenizer
    lm.eval()

    texts = [tok(json.loads(line)["text"])["input_ids"]
             for line in (data_root / "general" / "regularization.jsonl").read_text().splitlines()[:N_BACKGROUND]]
    with module.reference():  # selection sees the unedited Backpack
        background = reference_background(lm, texts)
        per_example = [reference_importance(lm, tok, r, loss, background) for r in records]

        # every example's candidates and importances
        bg = torch.zeros(lm.config.vocab_size, lm.config.num_senses)
        for (word, sense), value in background.items():
            bg[word, sense] = value
        got = example_importance(lm, dm.load("canonical").examples, dm.task.loss, bg, LAMBDA, dm.pad_id)
    senses = lm.config.num_senses
    for ref, (keys, importance) in zip(per_example, got, strict=True):
        mine = {(int(k) // senses, int(k) % senses): float(v) for k, v in zip(keys, importance, strict=True)}
        assert set(mine) == set(ref)
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, rel=1e-4, abs=1e-5)

    # the module's selection (its own cached background, top-k per example, union)
    selected = set(zip(module.selection.vocab_ids.tolist(), module.selection.sense_ids.tolist(), strict=True))
    assert selected == reference_selection(per_example)
    # the background term matters here: lambda x background changes some example's top-k
    assert reference_selection([{k: v + LAMBDA * background.get(k, 0.0) for k, v in c.items()}
                                for c in per_example]) != selected

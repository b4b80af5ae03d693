"""Issue 37 item 5: ``benchmarks/peer_eval.py`` runs the paper's own scoring code (from a checkout of its repository,
never copied here) beside our evaluator on the same model and examples, and compares the failure flags.

The tests that run the paper's code need its checkout: set ``EDITING_PEER_REFERENCE`` to it (``git clone
https://github.com/john-hewitt/model-editing-canonical-examples PATH``); without it they are skipped, saying so.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PEER_EVAL = REPO / "benchmarks" / "peer_eval.py"
REFERENCE = os.environ.get("EDITING_PEER_REFERENCE", "")
needs_reference = pytest.mark.skipif(
    not (REFERENCE and (Path(REFERENCE) / "evaluate.py").is_file() and (Path(REFERENCE) / "utils.py").is_file()),
    reason="the paper's repository is not checked out: set EDITING_PEER_REFERENCE to a clone of "
           "https://github.com/john-hewitt/model-editing-canonical-examples (see benchmarks/peer_eval.py)")
# SPEC section 2's thresholds and loss types, written out here
THRESHOLDS = {"country_capital": -math.log(0.2), "stereoset": math.log(0.001), "verb_conjugation": math.log(1 / 16)}
LOSSES = {"country_capital": "good", "stereoset": "bad", "verb_conjugation": "good-v-bad"}
SPLIT_FILES = {"country_capital": "country_capital_clear_eval", "stereoset": "stereoset_eval_clear",
               "verb_conjugation": "verb_conjugation_eval"}


def _run(args: list[str], tmp_path: Path, env: dict | None = None, code: str | None = None):
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, str(PEER_EVAL), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)


def test_without_a_checkout_it_says_how_to_get_one(tmp_path) -> None:
    assert PEER_EVAL.is_file(), "benchmarks/peer_eval.py is missing"
    empty = tmp_path / "not-a-checkout"
    empty.mkdir()
    done = _run(["--reference", str(empty), "--model", "tiny-llama"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert str(empty) in done.stderr and "evaluate.py" in done.stderr and "git clone" in done.stderr
    assert "Traceback" not in done.stderr
    env = {k: v for k, v in os.environ.items() if k != "EDITING_PEER_REFERENCE"}
    done = subprocess.run([sys.executable, str(PEER_EVAL), "--model", "tiny-llama"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "EDITING_PEER_REFERENCE" in done.stderr and "Traceback" not in done.stderr


@torch.no_grad()
def _plain_scores(task: str, limit: int, data_root: Path) -> tuple[list[float], list[bool]]:
    """SPEC sections 3 and 5 by hand: prefix ids (default special tokens) then each suffix's ids (none), one
    forward pass per sequence, float64 log-softmax, the suffix tokens' NLL summed, the loss type's score."""
    from editing.models.loading import load_model

    loaded = load_model(name="tiny-llama", precision="fp32")
    tok, model = loaded.tokenizer, loaded.model
    path = data_root / task / "split" / f"{SPLIT_FILES[task]}-val.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()][:limit]
    scores = []
    for line in lines:
        sums = []
        for key in ("suffix1", "suffix2") if "suffix1" in line else ("suffix",):
            prefix = tok(line["prefix"])["input_ids"]
            suffix = tok(line[key], add_special_tokens=False)["input_ids"]
            ids = prefix + suffix
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
            sums.append(sum(-float(logprobs[t - 1, ids[t]]) for t in range(len(prefix), len(ids))))
        loss = LOSSES[task]
        scores.append({"good": sums[0], "bad": -sums[0], "good-v-bad": sums[0] - sums[-1],
                       "balance": abs(sums[0] - sums[-1])}[loss])
    return scores, [s > THRESHOLDS[task] for s in scores]


@torch.no_grad()
def _plain_general_nll(texts: int, data_root: Path) -> float:
    """G's token-mean NLL by hand: each text's ids (the tokenizer maps the leading <|endoftext|> to its own token),
    every position after the first scored, float64 log-softmax."""
    from editing.models.loading import load_model

    loaded = load_model(name="tiny-llama", precision="fp32")
    lines = (data_root / "general" / "degradation.jsonl").read_text().splitlines()[:texts]
    total, count = 0.0, 0
    for line in lines:
        ids = loaded.tokenizer(json.loads(line)["text"])["input_ids"]
        logprobs = torch.log_softmax(loaded.model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        total += sum(-float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
        count += len(ids) - 1
    return total / count


@needs_reference
def test_the_papers_flags_and_ours_agree_with_a_plain_loop(tmp_path, data_root) -> None:
    out = tmp_path / "peer.json"
    done = _run(["--reference", REFERENCE, "--model", "tiny-llama", "--task", "country_capital", "stereoset",
                 "verb_conjugation", "--limit", "4", "--general", "3", "--repeat", "1", "--float64", "--json",
                 str(out)], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "IDENTICAL example by example" in done.stdout and "tokens/s" in done.stdout
    report = json.loads(out.read_text())
    general = _plain_general_nll(3, data_root)
    flags_seen = set()
    for task in report["tasks"]:
        plain, plain_failed = _plain_scores(task["task"], 4, data_root)
        rows = task["per_example"]
        assert len(rows) == 4 and task["same_tokens"] and task["differing"] == []
        assert [r["peer_failed"] for r in rows] == [r["ours_failed"] for r in rows] == plain_failed
        flags_seen |= set(plain_failed)
        for row, expected in zip(rows, plain, strict=True):
            assert row["peer_score"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
            assert row["ours_score"] == pytest.approx(expected, rel=1e-5, abs=1e-4)
        nll = task["general_nll"]
        assert nll["float64"] == pytest.approx(general, rel=1e-9)
        assert nll["ours"] == pytest.approx(general, rel=1e-6) and nll["peer"] == pytest.approx(general, rel=1e-5)
        assert nll["relative_difference"] < 1e-5
        assert all(v > 0 for v in task["tokens_per_s"].values())
    assert flags_seen == {True, False}  # the tasks chosen give both outcomes on this model


@needs_reference
def test_a_flag_that_differs_is_listed_and_fails_the_run(tmp_path) -> None:
    # the paper's code is run as usual; its first flag is then flipped, as a disagreeing evaluator would report it
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('peer_eval', {str(PEER_EVAL)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['peer_eval'] = m; spec.loader.exec_module(m)\n"
        "real = m.PeerScorer.failed\n"
        "def flipped(self):\n"
        "    flags = real(self)\n"
        "    return [not flags[0], *flags[1:]]\n"
        "m.PeerScorer.failed = flipped\n"
        "sys.exit(m.main(sys.argv[1:]))\n"
    )
    done = _run(["--reference", REFERENCE, "--model", "tiny-llama", "--limit", "3", "--general", "2", "--repeat",
                 "1"], tmp_path, code=code)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 DIFFER" in done.stdout and "example 0 (line 1)" in done.stdout

"""``editing generate`` and ``EditResult.generate``: base and edited continuations, checked against a plain loop of
argmax over the model's full logits written here."""

from __future__ import annotations

import pytest
import torch
from edit_kinds import KINDS, make_edit

from editing.cli import main
from editing.core.errors import ConfigError
from editing.edits.load import load_edited
from editing.models.generation import Sampling, continue_prompt

PROMPTS = ["The capital of France is", "Paris is the capital of", "My favourite colour"]


@torch.no_grad()
def argmax_loop(model, tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding the plainest way: the whole sequence through the model, argmax of the last logits, append;
    stop at the end-of-text token."""
    ids = list(tokenizer(prompt)["input_ids"])
    new = []
    for _ in range(steps):
        logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
        token = int(torch.argmax(logits))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
    return tokenizer.decode(new)


@torch.no_grad()
def first_argmax(model, tokenizer, prompt: str) -> int:
    return int(torch.argmax(model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1]))


@pytest.fixture(scope="module")
def saved_edits(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("generate")
    return {kind: make_edit(kind, root / kind, scale=3.0, data_root=data_root) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_generate_prints_base_and_edited_greedy_continuations(kind, saved_edits, capsys) -> None:
    folder = saved_edits[kind]
    main(["generate", "--edit", str(folder), *sum((["--prompt", p] for p in PROMPTS), []), "--max_new_tokens", "6"])
    out = capsys.readouterr().out
    edited = load_edited(folder)
    tokenizer = edited.tokenizer
    changed = 0
    for prompt in PROMPTS:
        want_edited = argmax_loop(edited.model, tokenizer, prompt, 6)
        first_edited = first_argmax(edited.model, tokenizer, prompt)
        with edited.reference() as base:
            want_base = argmax_loop(base, tokenizer, prompt, 6)
            first_base = first_argmax(base, tokenizer, prompt)
        same = "yes" if want_base == want_edited else "no"
        assert f"| {cell(prompt)} | {cell(want_base)} | {cell(want_edited)} | {same} |" in out.splitlines()
        if first_edited != first_base:  # the edit changed the argmax: the continuations differ from there on
            changed += 1
            assert want_base != want_edited
    assert changed >= 1, "the random edit should change the first greedy token of some prompt"


def cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("|", "\\|")


def test_sampling_is_reproducible_and_top_k_one_is_greedy(saved_edits) -> None:
    edited = load_edited(saved_edits["lora"])
    prompt = PROMPTS[0]
    draw = Sampling(sample=True, temperature=1.5, seed=3)
    first = continue_prompt(edited.model, edited.tokenizer, prompt, 8, draw)
    assert first == continue_prompt(edited.model, edited.tokenizer, prompt, 8, draw)
    others = {continue_prompt(edited.model, edited.tokenizer, prompt, 8, Sampling(sample=True, temperature=1.5,
                                                                                  seed=s)) for s in range(4, 9)}
    assert len(others | {first}) > 1  # a draw, not the argmax
    greedy = argmax_loop(edited.model, edited.tokenizer, prompt, 8)
    assert continue_prompt(edited.model, edited.tokenizer, prompt, 8, Sampling(sample=True, top_k=1, seed=1)) == greedy


def test_bad_generate_options_are_clear_errors(saved_edits, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--edit", str(saved_edits["lora"]), "--prompt", "x", "--temperature", "0.5"])
    assert "--sample true" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="temperature"):
        Sampling(sample=True, temperature=0)
    with pytest.raises(ConfigError, match="top_p"):
        Sampling(sample=True, top_p=0)

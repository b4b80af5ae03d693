"""``--data.chat_template``: canonical examples asked through a chat template (the prefix as the user's turn, the
suffix, without its leading spaces, as the start of the assistant's reply), checked against the rendered turn
written out by hand here; texts stay bare; generation and ``editing apply`` use the fit's setting."""

from __future__ import annotations

import json
import os

import pytest
import torch

from editing.cli import main
from editing.core.errors import ConfigError, DataFormatError
from editing.data.chat import load_chat_template
from editing.data.datamodule import TaskDataModule
from editing.models.generation import continue_prompt
from editing.models.loading import ModelConfig, load_model

# SmolLM2-Instruct's template (tiny-llama uses SmolLM2's tokenizer), written out: a default system turn, the user's
# turn, and the start of the assistant's
SMOL_HEAD = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
             "<|im_start|>user\n")
SMOL_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
PLAIN = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"


@pytest.fixture(scope="module")
def llama():
    return load_model(ModelConfig(name="tiny-llama", precision="fp32"))


@pytest.fixture(scope="module")
def gpt2():
    return load_model(ModelConfig(name="tiny-gpt2", precision="fp32"))


def loaded(model, data_root, chat, task: str = "country_capital") -> TaskDataModule:
    dm = TaskDataModule(task=task, data_root=str(data_root), eval_limit=4, general_limit=3, chat_template=chat)
    dm.attach(model.tokenizer, model.max_length)
    for role in ("canonical", "evaluation", "general"):
        dm.load(role)
    return dm


def by_hand(tok, head: str, tail: str, prefix: str, suffix: str) -> tuple[list[int], int]:
    prompt = tok(head + prefix + tail, add_special_tokens=False)["input_ids"]
    return list(prompt) + list(tok(suffix.lstrip(" "), add_special_tokens=False)["input_ids"]), len(prompt)


@pytest.mark.parametrize("role", ["canonical", "evaluation"])
def test_examples_are_the_rendered_user_turn_then_the_reply(llama, data_root, role) -> None:
    dm = loaded(llama, data_root, True)
    tok = llama.tokenizer
    records = dm.records(role)
    for record, example in zip(records, dm.sets[role].examples, strict=True):
        for suffix, seq in zip(record.suffixes, example.sequences, strict=True):
            ids, score_from = by_hand(tok, SMOL_HEAD, SMOL_TAIL, record.prefix, suffix)
            assert (seq.ids, seq.score_from) == (ids, score_from), record.prefix
    assert tok.decode(dm.sets[role].examples[0].sequences[0].ids).startswith("<|im_start|>system")


def test_texts_stay_bare_and_without_a_template_nothing_changes(llama, data_root) -> None:
    chat, bare = loaded(llama, data_root, True), loaded(llama, data_root, False)
    assert [s.ids for e in chat.sets["general"].examples for s in e.sequences] == \
        [s.ids for e in bare.sets["general"].examples for s in e.sequences]
    tok = llama.tokenizer
    for record, example in zip(bare.records("evaluation"), bare.sets["evaluation"].examples, strict=True):
        prefix = tok(record.prefix)["input_ids"]
        assert example.sequences[0].ids == prefix + tok(record.suffixes[0], add_special_tokens=False)["input_ids"]


def test_a_jinja_template_as_text_or_file_serves_a_tokenizer_without_one(gpt2, data_root, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data\.chat_template=true, but the tokenizer .* has no chat template; "
                                          r"set data\.chat_template false"):
        loaded(gpt2, data_root, True)
    template_file = tmp_path / "turns.jinja"
    template_file.write_text(PLAIN, encoding="utf-8")
    tok = gpt2.tokenizer
    for setting in (PLAIN, str(template_file)):
        dm = loaded(gpt2, data_root, setting)
        record, example = dm.records("canonical")[0], dm.sets["canonical"].examples[0]
        assert (example.sequences[0].ids, example.sequences[0].score_from) == \
            by_hand(tok, "User: ", "\nAssistant:", record.prefix, record.suffixes[0])
    with pytest.raises(ConfigError, match=r"data\.chat_template='/nonexistent/t\.jinja': cannot read the template"):
        loaded(gpt2, data_root, "/nonexistent/t.jinja")


def test_a_template_that_changes_the_users_text_is_refused(gpt2) -> None:
    with pytest.raises(ConfigError, match="changes the user's text"):
        load_chat_template(gpt2.tokenizer, "{{ messages[0]['content'] | upper }} A:")
    with pytest.raises(ConfigError, match="writes the user's text 2 times"):
        load_chat_template(gpt2.tokenizer, "{{ messages[0]['content'] }} / {{ messages[0]['content'] }}")


def test_an_example_too_long_for_the_context_in_its_template_names_the_line(gpt2, data_root, tmp_path) -> None:
    path = tmp_path / "canonical.jsonl"
    path.write_text(json.dumps({"prefix": "a", "suffix": " b"}) + "\n"
                    + json.dumps({"prefix": "word " * 40, "suffix": " b"}) + "\n", encoding="utf-8")
    from editing.data.jsonl import read_jsonl
    from editing.data.tokenize import ExampleTokenizer

    tokenizer = ExampleTokenizer(gpt2.tokenizer, 30, chat=load_chat_template(gpt2.tokenizer, PLAIN))
    with pytest.raises(DataFormatError, match=r"canonical\.jsonl.*line 2.*longer than the model's context \(30\)"):
        tokenizer.examples(read_jsonl(path, "single"), str(path))


@torch.no_grad()
def test_generation_continues_the_assistants_turn_and_stops_at_its_end(llama) -> None:
    tok, model = llama.tokenizer, llama.model
    chat = load_chat_template(tok, True)
    prompt = "The capital of France is"
    ids = list(tok(SMOL_HEAD + prompt + SMOL_TAIL, add_special_tokens=False)["input_ids"])
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")}
    new = []
    for _ in range(8):  # greedy, the plainest way
        token = int(torch.argmax(model(input_ids=torch.tensor([ids + new])).logits[0, -1]))
        if token in stops:
            break
        new.append(token)
    assert continue_prompt(model, tok, prompt, 8, chat=chat) == tok.decode(new)
    assert set(chat.turn_end_ids()) == {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")}


def test_a_chat_fit_applies_and_generates_with_its_own_setting(tmp_path, data_root, capsys) -> None:
    """The fit records the setting; ``editing apply`` reads it and reproduces the fit's numbers (and without it
    measures other numbers: the bare prefixes)."""
    from editing.commands.apply import apply_edit

    config = os.path.join(os.path.dirname(__file__), "..", "..", "lightning_configs", "tiny", "lora.yaml")
    run = tmp_path / "run"
    main(["fit", "--config", config, "--model.init_args.base.name", "tiny-llama", "--data.chat_template", "true",
          "--data.data_root", str(data_root), "--budget.output_dir", str(run)])
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["data"]["chat_template"] is True
    key, folder = max(results["edits"].items(), key=lambda kv: results["balls"][kv[0]]["epoch"])
    ball = results["balls"][key]
    assert ball["epoch"] > 0
    limits = {"task": "country_capital", "eval_limit": 6, "general_limit": 8, "data_root": str(data_root)}
    got = apply_edit(edit=folder, output_dir=str(tmp_path / "applied"), **limits)
    for name in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
        if ball["metrics"].get(name) is not None:
            assert got[name] == pytest.approx(ball["metrics"][name], rel=1e-6, abs=1e-9), name
    bare = apply_edit(edit=folder, output_dir=str(tmp_path / "bare"), chat_template=False, **limits)
    for texts in ("general_nll", "targeted_nll"):  # texts are bare either way
        assert bare[texts] == pytest.approx(got[texts], rel=1e-6)
    assert bare["hard_negative_nll"] != pytest.approx(got["hard_negative_nll"], rel=1e-3)  # examples are not
    capsys.readouterr()
    main(["generate", "--edit", folder, "--prompt", "The capital of France is", "--max_new_tokens", "3"])
    assert "in the chat template" in capsys.readouterr().out


def test_memit_rows_ask_the_prompt_in_the_template_and_find_the_subject_there(llama) -> None:
    from editing.methods.memit.requests import Request, RowBuilder

    tok = llama.tokenizer
    chat = load_chat_template(tok, True)
    request = Request("The capital of Mauritius is", (" Port Louis",), (15, 24))  # subject: "Mauritius"
    rows = RowBuilder(tok, llama.max_length, chat=chat).rows([request], ["", "Once upon a time. "], with_suffixes=True)
    for row, template in zip(rows, ["", "Once upon a time. "], strict=True):
        ids, score_from = by_hand(tok, SMOL_HEAD, SMOL_TAIL, template + request.prefix, request.suffixes[0])
        assert (row.ids, row.score_from) == (ids, score_from)
        # the subject's last token: the last one of the turn's text up to the end of "Mauritius"
        upto = tok(SMOL_HEAD + template + "The capital of Mauritius", add_special_tokens=False)["input_ids"]
        assert row.subject_pos == len(upto) - 1
        assert tok.decode(row.ids[row.subject_pos]).strip() in "Mauritius"


def test_a_memit_fit_in_the_template_asks_its_requests_there_and_applies_to_its_numbers(tmp_path, data_root,
                                                                                         monkeypatch) -> None:
    from editing.commands.apply import apply_edit
    from editing.methods.memit import requests as memit_requests

    seen = []
    original = memit_requests.RowBuilder.rows

    def spy(self, requests, templates, with_suffixes):
        rows = original(self, requests, templates, with_suffixes)
        seen.extend(self.tokenizer.decode(r.ids) for r in rows)
        return rows

    monkeypatch.setattr(memit_requests.RowBuilder, "rows", spy)
    config = os.path.join(os.path.dirname(__file__), "..", "..", "lightning_configs", "tiny", "memit.yaml")
    run = tmp_path / "run"
    main(["fit", "--config", config, "--model.init_args.base.name", "tiny-llama", "--data.chat_template", "true",
          "--data.data_root", str(data_root), "--budget.output_dir", str(run)])
    assert seen and all(text.startswith(SMOL_HEAD) and SMOL_TAIL in text for text in seen)
    results = json.loads((run / "results.json").read_text())
    key, folder = max(results["edits"].items(), key=lambda kv: results["balls"][kv[0]]["epoch"])
    ball = results["balls"][key]
    assert ball["epoch"] > 0
    data = results["config"]["data"]
    got = apply_edit(edit=folder, output_dir=str(tmp_path / "applied"), data_root=str(data_root),
                     task=data["task"], eval_limit=data.get("eval_limit"), general_limit=data.get("general_limit"))
    for name in ("success_rate", "general_nll", "hard_negative_nll"):
        if ball["metrics"].get(name) is not None:
            assert got[name] == pytest.approx(ball["metrics"][name], rel=1e-6, abs=1e-9), name


def test_the_python_api_fits_and_generates_in_the_template(tmp_path, data_root) -> None:
    from editing import edit

    examples = [{"prefix": "The capital of Zorbia is", "suffix": " Quentaville"},
                {"prefix": "Zorbia's capital city is called", "suffix": " Quentaville"}]
    with pytest.raises(ConfigError, match=r"edit\(chat_template=1\)"):
        edit("tiny-llama", examples, chat_template=1, output_dir=tmp_path / "bad")
    result = edit("tiny-llama", examples, ball=0.5, epochs=1, chat_template=True, output_dir=tmp_path / "api",
                  data_root=data_root, settings={"data.general_limit": 4, "trainer.accelerator": "cpu",
                                                 "model.init_args.optimizer.lr": 0.05,
                                                 "trainer.accumulate_grad_batches": 1})
    assert result.run.config["data"]["chat_template"] is True
    chat = load_chat_template(result.tokenizer, True)
    prompt = "The capital of Zorbia is"
    want = continue_prompt(result.model, result.tokenizer, prompt, 4, chat=chat)
    assert result.generate(prompt, max_new_tokens=4) == want
    assert want != continue_prompt(result.model, result.tokenizer, prompt, 4)  # so the template was used


@pytest.mark.parametrize(("config", "expected"), [
    ({"data": {"chat_template": True}}, True), ({"data": {"chat_template": "{{ x }}"}}, "{{ x }}"),
    ({"data": {"chat_template": 3}}, False), ({"data": {}}, False), ({"data": None}, False), (None, False)])
def test_a_run_says_which_chat_template_it_was_fitted_with(config, expected) -> None:
    """``RunRecord.chat_template`` (read by ``EditResult.generate`` and by combining): the setting, or False."""
    from editing.runs.records import RunRecord

    record = object.__new__(RunRecord)
    record.config = config
    assert record.chat_template == expected

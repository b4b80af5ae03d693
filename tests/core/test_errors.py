"""Bad input gives clear errors that name the file, line or setting at fault."""

from __future__ import annotations

import json

import pytest

from editing.core.errors import ConfigError, DataFormatError, EditingError, ModelNotAvailableError
from editing.core.paths import resolve_data_root
from editing.data.datamodule import TaskDataModule
from editing.data.jsonl import read_jsonl
from editing.models.loading import load_model
from editing.rules.tasks import TaskSpec, get_task, load_task_yaml

GOOD = json.dumps({"prefix": "The capital of France is", "suffix": " Paris"})


def _file(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


# --- JSONL ---------------------------------------------------------------------------------------------------------

def test_malformed_json_names_file_and_line(tmp_path):
    path = _file(tmp_path, [GOOD, "", '{"prefix": "x", "suffix": " y"', GOOD])  # line 2 blank, line 3 broken
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path, "single")
    msg = str(info.value)
    assert str(path) in msg and "line 3" in msg and "JSON" in msg
    assert info.value.line == 3 and info.value.path == str(path)


def test_missing_key_names_key_and_line(tmp_path):
    path = _file(tmp_path, [GOOD, json.dumps({"prefix": "a", "answer": " b"})])
    with pytest.raises(DataFormatError, match=r"line 2: missing key 'suffix'") as info:
        read_jsonl(path, "single")
    assert str(path) in str(info.value)


def test_missing_pair_key(tmp_path):
    path = _file(tmp_path, [json.dumps({"prefix": "a", "suffix1": " b"})])
    with pytest.raises(DataFormatError, match=r"line 1: missing key 'suffix2'"):
        read_jsonl(path, "pair")


def test_missing_text_key(tmp_path):
    path = _file(tmp_path, [json.dumps({"txt": "a b c"})])
    with pytest.raises(DataFormatError, match=r"line 1: missing key 'text'"):
        read_jsonl(path, "text")


def test_empty_suffix(tmp_path):
    path = _file(tmp_path, [GOOD, GOOD, json.dumps({"prefix": "a", "suffix": ""})])
    with pytest.raises(DataFormatError, match=r"line 3: field 'suffix' is empty"):
        read_jsonl(path, "single")


def test_non_string_field(tmp_path):
    path = _file(tmp_path, [json.dumps({"prefix": "a", "suffix": 3})])
    with pytest.raises(DataFormatError, match=r"line 1: field 'suffix' must be a string, got int"):
        read_jsonl(path, "single")


@pytest.mark.parametrize("line, kind", [("[1, 2]", "list"), ('"just a string"', "str"), ("42", "int")])
def test_non_object_line(tmp_path, line, kind):
    path = _file(tmp_path, [GOOD, line])
    with pytest.raises(DataFormatError, match=rf"line 2: expected a JSON object, got {kind}") as info:
        read_jsonl(path, "single")
    assert str(path) in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataFormatError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl", "single")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no examples"):
        read_jsonl(tmp_path / "empty.jsonl", "single")


def test_valid_file_extra_keys_ignored_and_limit(tmp_path):
    rows = [{"prefix": f"p{i}", "suffix": f" s{i}", "country": "X"} for i in range(5)]
    path = _file(tmp_path, [json.dumps(r) for r in rows[:2]] + [""] + [json.dumps(r) for r in rows[2:]])
    recs = read_jsonl(path, "single")
    assert [r.index for r in recs] == [0, 1, 2, 3, 4]
    assert [r.line for r in recs] == [1, 2, 4, 5, 6]
    assert recs[3].prefix == "p3" and recs[3].suffixes == (" s3",) and recs[3].fields["country"] == "X"
    assert len(read_jsonl(path, "single", limit=3)) == 3


def test_suffix_or_text_lines(tmp_path):
    path = _file(tmp_path, [GOOD, json.dumps({"text": "hello there"})])
    a, b = read_jsonl(path, "suffix_or_text")
    assert a.text is None and a.suffixes == (" Paris",)
    assert b.text == "hello there" and b.suffixes == ()


def test_bad_data_reaches_the_user_through_the_datamodule(tmp_path, tiny_module):
    from editing.evaluation import evaluate

    _file(tmp_path, [GOOD, '{"prefix": "broken"'], name="ev-val.jsonl")
    (tmp_path / "broken_task.yaml").write_text(
        "loss: good\nthreshold: 1.0\ncanonical: ev-{split}.jsonl\nevaluation: ev-{split}.jsonl\n")
    dm = TaskDataModule(task=str(tmp_path / "broken_task.yaml"), general_limit=2)
    with pytest.raises(DataFormatError, match=rf"{tmp_path / 'ev-val.jsonl'}, line 2"):
        evaluate(tiny_module("tiny-gpt2"), dm, roles=["evaluation"])


# --- tasks -----------------------------------------------------------------------------------------------------------

def test_unknown_task_name():
    with pytest.raises(ConfigError, match=r"unknown task 'country_capitol'.*country_capital"):
        get_task("country_capitol")
    with pytest.raises(ConfigError, match="unknown task"):
        TaskDataModule(task="country_capitol")


def test_missing_task_yaml():
    with pytest.raises(ConfigError, match="does not exist"):
        get_task("/no/such/task.yaml")


@pytest.mark.parametrize("body, message", [
    ("loss: good\nthreshold: 1.0\ncanonical: a.jsonl\n", r"missing key 'evaluation'"),
    ("threshold: 1.0\ncanonical: a.jsonl\nevaluation: b.jsonl\n", r"missing key 'loss'"),
    ("loss: good\ncanonical: a.jsonl\nevaluation: b.jsonl\n", r"missing key 'threshold'"),
    ("loss: good\nthreshold: 1.0\ncanonical: a.jsonl\nevaluation: b.jsonl\nevaluaton_limit: 3\n",
     r"unknown key\(s\) \['evaluaton_limit'\]"),
    ("loss: better\nthreshold: 1.0\ncanonical: a.jsonl\nevaluation: b.jsonl\n", r"'loss' is 'better'"),
    ("loss: good\nthreshold: high\ncanonical: a.jsonl\nevaluation: b.jsonl\n", r"'threshold' must be a number"),
    ("- just\n- a list\n", "expected a mapping"),
    ("loss: [unclosed\n", "not valid YAML"),
    ("loss: good\nthreshold: 1.0\ncanonical: a.jsonl\nevaluation: b.jsonl\nbuiltin: true\n", r"unknown key"),
])
def test_bad_task_yaml(tmp_path, body, message):
    path = tmp_path / "task.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        load_task_yaml(path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match=message):
        TaskDataModule(task=str(path))


def test_task_file_bad_role_and_split():
    spec = get_task("stereoset")
    with pytest.raises(ConfigError, match="unknown role"):
        spec.file("training", "val", "/data")
    with pytest.raises(ConfigError, match="split='train'"):
        spec.file("evaluation", "train", "/data")
    with pytest.raises(ConfigError, match="data root"):
        spec.file("evaluation", "val")
    user = TaskSpec("t", "good", 1.0, "c-{split}.jsonl", "e-{split}.jsonl", base_dir="/base")
    assert str(user.file("evaluation", "test")) == "/base/e-test.jsonl"
    assert user.file("targeted", "val") is None


# --- datamodule settings ---------------------------------------------------------------------------------------------

def test_bad_split(data_root):
    with pytest.raises(ConfigError, match=r"data.split='train'"):
        TaskDataModule(task="stereoset", split="train", data_root=str(data_root))


@pytest.mark.parametrize("key", ["eval_limit", "general_limit"])
def test_non_positive_limits(data_root, key):
    with pytest.raises(ConfigError, match=rf"data.{key}=0"):
        TaskDataModule(task="stereoset", data_root=str(data_root), **{key: 0})


def test_data_root_without_data(tmp_path):
    (tmp_path / "stereoset").mkdir()
    with pytest.raises(ConfigError, match=r"data_root=.*does not hold the task data.*editing data download"):
        TaskDataModule(task="stereoset", data_root=str(tmp_path))
    with pytest.raises(ConfigError, match="does not hold"):
        resolve_data_root(tmp_path / "missing")


def test_no_data_root_anywhere(monkeypatch, tmp_path):
    import editing.core.paths as paths

    monkeypatch.setenv("EDITING_DATA_ROOT", str(tmp_path / "a"))
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "REPO_DIR", tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no data root found.*editing data download"):
        resolve_data_root(None)


def test_loading_before_attach_is_an_error(data_root):
    dm = TaskDataModule(task="stereoset", data_root=str(data_root))
    with pytest.raises(RuntimeError, match="attach"):
        dm.load("evaluation")


# --- models ----------------------------------------------------------------------------------------------------------

def test_unknown_hub_model_offline(offline_hub):
    with pytest.raises(ModelNotAvailableError, match=r"no-such-org/no-such-model-xyz.*hub cannot be reached") as info:
        load_model(name="no-such-org/no-such-model-xyz", precision="fp32")
    assert isinstance(info.value, EditingError)


def test_bad_precision():
    with pytest.raises(ConfigError, match=r"model.precision='fp16'.*fp32"):
        load_model(name="tiny-gpt2", precision="fp16")


def test_model_name_is_a_plain_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        load_model(name=str(path), precision="fp32")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        load_model(name=str(tmp_path / "model.gguf"), precision="fp32")


# --- issue 34 item 14: text a tokenizer cannot take (a lone surrogate) ------------------------------------------------
@pytest.mark.parametrize("kind, line, field", [
    ("single", {"prefix": "The capital of \ud800 France is", "suffix": " Paris"}, "prefix"),
    ("single", {"prefix": "The capital of France is", "suffix": " Par\udfffis"}, "suffix"),
    ("pair", {"prefix": "a", "suffix1": " b", "suffix2": " \udc80c"}, "suffix2"),
    ("text", {"text": "fine \ud83d then"}, "text"),
])
def test_a_lone_surrogate_names_the_file_line_field_and_character(tmp_path, kind, line, field):
    good = {"single": GOOD, "pair": json.dumps({"prefix": "a", "suffix1": " b", "suffix2": " c"}),
            "text": json.dumps({"text": "fine text"})}[kind]
    path = _file(tmp_path, [good, json.dumps(line)])  # json.dumps writes the surrogate as a \\uXXXX escape
    value = line[field]
    position = next(i for i, ch in enumerate(value) if 0xD800 <= ord(ch) <= 0xDFFF)
    with pytest.raises(DataFormatError) as info:
        read_jsonl(path, kind)
    message = str(info.value)
    assert info.value.line == 2 and str(path) in message and f"field {field!r}" in message
    assert f"character {position + 1} is U+{ord(value[position]):04X}, a lone surrogate" in message
    assert "surrogate pair" in message
    # a surrogate pair written as two escapes is one character, and is fine
    _file(tmp_path, [good, json.dumps({**line, field: "emoji \U0001f600"})], name="ok.jsonl")
    assert len(read_jsonl(tmp_path / "ok.jsonl", kind)) == 2


def test_a_prompt_that_is_not_text_is_a_clear_error(tiny_module, capsys):
    from editing.cli import main
    from editing.models.generation import continue_prompt

    module = tiny_module("tiny-gpt2")
    with pytest.raises(ConfigError, match=r"character 4 is U\+D800, a lone surrogate"):
        continue_prompt(module.model, module.loaded.tokenizer, "abc\ud800", max_new_tokens=1)
    # on the command line: the byte 0xe7 arrives as U+DCE7; the message names which --prompt, before any loading
    with pytest.raises(SystemExit) as info:
        main(["generate", "--edit", "no-such-edit", "--prompt", "fine", "--prompt", "Cura\udce7ao"])
    assert info.value.code == 2
    assert "--prompt 2: byte 0xe7 at character 5 is not UTF-8 text" in capsys.readouterr().err

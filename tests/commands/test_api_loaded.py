"""Issue 36 item 2: ``edit(model=<a loaded transformers or peft model>, tokenizer=...)`` edits the model the caller
holds, in this process, without reading weights from disk; the caller's model is untouched unless ``inplace=True``;
a second edit reuses the held base and the p0 cache; the numbers are those of ``editing fit``."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from editing.core.errors import ConfigError

EXAMPLES = [{"prefix": "The capital of Zorbia is", "suffix": " Quentaville"},
            {"prefix": "Zorbia's capital city is called", "suffix": " Quentaville"}]
SETTINGS = {"data.general_limit": 6, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
            "trainer.accelerator": "cpu", "model.init_args.optimizer.lr": 0.05, "trainer.accumulate_grad_batches": 1}
BALLS = [0.5, 1e-3]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def one_thread():
    """One torch thread, so that the API's run and the command's run sum their products in the same order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """tiny-llama written by ``save_pretrained`` (model and tokenizer), as a practitioner's model folder (read
    only)."""
    from editing.models.loading import load_model

    loaded = load_model(name="tiny-llama")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    loaded.model.save_pretrained(str(folder))
    loaded.tokenizer.save_pretrained(str(folder))
    return folder


def _from_pretrained(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _no_disk_or_subprocess(monkeypatch) -> None:
    """Any weight read from disk, any model built by name, or any subprocess during the edit fails the test."""
    import transformers

    from editing.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError(f"the edit read a model from disk or started a process: {args!r:.200}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(loading, "_load_pretrained", refuse)
    monkeypatch.setattr(loading, "build_tiny", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


def _cli_fit(folder: Path, out: Path, data_root: Path, task: Path) -> dict:
    """``editing fit`` with the same settings (in this process: its own command-line path, shipped config)."""
    from editing.cli import main

    args = ["fit", "--config", str(REPO / "lightning_configs/fit/lora.yaml"), "--model.init_args.base.name",
            str(folder), "--data.task", str(task), "--data.data_root", str(data_root), "--budget.balls",
            json.dumps(BALLS), "--trainer.max_epochs", "2", "--seed_everything", "0", "--data.seed", "0",
            "--budget.output_dir", str(out), "--trainer.default_root_dir", str(out)]
    for key, value in SETTINGS.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    main(args)
    return json.loads((out / "results.json").read_text())


def test_a_loaded_model_is_edited_in_this_process_with_the_numbers_of_editing_fit(tmp_path, tiny_folder, data_root,
                                                                                 monkeypatch, one_thread) -> None:
    from editing import edit
    from editing.evaluation.incremental import COUNTERS

    model, tokenizer = _from_pretrained(tiny_folder)
    before = _state(model)
    with monkeypatch.context() as patch:
        _no_disk_or_subprocess(patch)
        first = edit(model=model, tokenizer=tokenizer, examples=EXAMPLES, method="lora", ball=0.5, balls=BALLS,
                     threshold=9.0, name="zorbia", epochs=2, settings=SETTINGS, output_dir=tmp_path / "api",
                     data_root=data_root)
    assert _same_bits(_state(model), before)  # the caller's model is untouched
    assert first.model is not model

    # the command on the model's folder, with the task the API wrote: the same budget and numbers
    ref = _cli_fit(tiny_folder, tmp_path / "cli", data_root, tmp_path / "api" / "task" / "task.yaml")
    api = json.loads((tmp_path / "api" / "results.json").read_text())
    assert api["balls"].keys() == ref["balls"].keys()
    for key in ref["balls"]:
        assert api["balls"][key]["epoch"] == ref["balls"][key]["epoch"]
    assert len(api["epochs"]) == len(ref["epochs"]) == 3
    for mine, theirs in zip(api["epochs"], ref["epochs"], strict=True):
        numbers = {k: v for k, v in theirs.items() if isinstance(v, float)}
        assert "general_nll" in numbers and mine["counts"] == theirs["counts"]
        for name, value in numbers.items():
            assert mine[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert api["epochs"][2]["general_nll"] != api["epochs"][0]["general_nll"]  # it trained

    # the base's identity: a digest of weights, config and tokenizer (not a name); its weights are the folder's
    identity = json.loads((first.edit_folder() / "base_model.json").read_text())
    cli_identity = json.loads((tmp_path / "cli" / "edits" / "ball_5e-01" / "base_model.json").read_text())
    assert identity["fingerprint"] == cli_identity["fingerprint"]
    assert identity["name"].startswith("memory:") and str(tiny_folder) not in identity["name"]
    assert {"config_sha256", "tokenizer_sha256"} <= identity.keys()
    # elsewhere, the edit loads onto the model's folder (its fingerprint checked)
    from editing.edits.load import load_edited
    from editing.models.loading import ModelConfig

    elsewhere = load_edited(first.edit_folder(), base=ModelConfig(name=str(tiny_folder)))
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        torch.testing.assert_close(elsewhere.model(input_ids=ids).logits, first.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)

    # a second edit of the same model: the held base and the p0 cache are reused (p0 computed zero times)
    COUNTERS.clear()
    with monkeypatch.context() as patch:
        _no_disk_or_subprocess(patch)
        second = edit(model=model, tokenizer=tokenizer, examples=EXAMPLES, method="lora", ball=0.5, balls=BALLS,
                      threshold=9.0, name="zorbia", epochs=1, settings={**SETTINGS, "model.init_args.optimizer.lr":
                                                                        0.02}, output_dir=tmp_path / "again",
                      data_root=data_root)
    assert COUNTERS["p0_computed"] == 0 and COUNTERS["p0_reused"] == 1
    assert second.run.initial.metrics == first.run.initial.metrics

    # the same model with one weight changed is another base: p0 is computed again, never read from the old entry
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    COUNTERS.clear()
    third = edit(model=model, tokenizer=tokenizer, examples=EXAMPLES, method="lora", ball=0.5, balls=BALLS,
                 threshold=9.0, name="zorbia", epochs=1, settings=SETTINGS, output_dir=tmp_path / "changed",
                 data_root=data_root)
    assert COUNTERS["p0_computed"] == 1 and COUNTERS["p0_reused"] == 0
    assert third.module.identity["fingerprint"] != identity["fingerprint"]
    assert third.run.initial.metrics.general_nll != first.run.initial.metrics.general_nll


def test_inplace_puts_the_edit_into_the_callers_model(tmp_path, tiny_folder, data_root) -> None:
    from safetensors.torch import load_file

    from editing import edit

    model, tokenizer = _from_pretrained(tiny_folder)
    before = _state(model)
    result = edit((model, tokenizer), EXAMPLES, method="full", ball=0.5, threshold=9.0, epochs=1, inplace=True,
                  settings={**SETTINGS, "model.init_args.optimizer.lr": 0.01,
                            "model.init_args.gradient_checkpointing": False},
                  output_dir=tmp_path / "run", data_root=data_root)
    assert result.model is model  # the caller's model IS the edited one
    changed = load_file(str(result.edit_folder() / "edit.safetensors"))
    params = dict(model.named_parameters())
    assert changed and all(torch.equal(params[name], value) for name, value in changed.items())
    assert not _same_bits(_state(model), before)
    assert _same_bits(_state(model), _state(result.module.model))  # every tensor, tied ones too, as load_edited's
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, result.module.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


def test_a_peft_model_is_edited_on_top_of_its_merged_active_adapter(tmp_path, tiny_folder, data_root) -> None:
    from peft import LoraConfig, get_peft_model

    from editing import edit
    from editing.models.loading import fingerprint

    model, tokenizer = _from_pretrained(tiny_folder)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    before = _state(peft_model)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)  # the adapter changes the model
    result = edit(model=peft_model, tokenizer=tokenizer, examples=EXAMPLES, method="lora", ball=0.5, threshold=9.0,
                  epochs=1, settings=SETTINGS, output_dir=tmp_path / "run", data_root=data_root)
    assert _same_bits(_state(peft_model), before)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    identity = json.loads((result.edit_folder() / "base_model.json").read_text())
    assert identity["fingerprint"] == fingerprint(merged)
    with result.module.reference() as base, torch.no_grad():  # p0 is the adapted model
        torch.testing.assert_close(base(input_ids=ids).logits, adapted, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"inplace=True.*peft.*merge_and_unload"):
        edit(model=peft_model, tokenizer=tokenizer, examples=EXAMPLES, inplace=True, output_dir=tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_a_loaded_model_given_wrongly_is_a_clear_error(tmp_path, tiny_folder) -> None:
    from editing import edit

    model, tokenizer = _from_pretrained(tiny_folder)
    cases = [
        ({"model": model}, r"edit\(model=LlamaForCausalLM\): pass its tokenizer too: edit\(model=model, "
                           r"tokenizer=tokenizer"),
        ({"model": "tiny-llama", "tokenizer": tokenizer}, r"edit\(tokenizer=\.\.\.\) goes with a loaded model"),
        ({"model": (model,)}, r"edit\(model=\(\.\.\.\)\): give a \(model, tokenizer\) pair"),
        ({"model": (model, tokenizer), "tokenizer": tokenizer}, r"give the tokenizer once"),
        ({"model": torch.nn.Linear(2, 2), "tokenizer": tokenizer}, r"edit\(model=Linear\): .*transformers"),
        ({"model": model, "tokenizer": "gpt2"}, r"edit\(tokenizer='gpt2'\): give the loaded tokenizer"),
        ({"model": "tiny-llama", "inplace": True}, r"edit\(inplace=True\) .*loaded model"),
        ({"model": model, "tokenizer": tokenizer, "inplace": True, "method": "grace"},
         r"edit\(inplace=True\): method 'grace'.* not a change of the weights"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            edit(examples=EXAMPLES, output_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()


def test_an_edit_of_a_held_model_is_refused_clearly_in_another_process(tmp_path) -> None:
    from editing.models.loading import ModelConfig, load_model

    with pytest.raises(ConfigError, match=r"memory:abc.* held in memory by the process .*save_pretrained"):
        load_model(ModelConfig(name="memory:abc"))


def test_the_example_script_runs_on_the_tiny_model(tmp_path, data_root, monkeypatch, capsys, one_thread) -> None:
    """``examples/edit_loaded_model.py --model tiny-llama``, run as ``__main__`` in this process (imports shared)."""
    import runpy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["edit_loaded_model.py", "--model", "tiny-llama", "--out", str(tmp_path / "out"),
                                      "--data_root", str(data_root), "--epochs", "1"])
    runpy.run_path(str(REPO / "examples" / "edit_loaded_model.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("before:") == 3 and out.count("after:") == 3, out
    assert out.count("model carries it: True") == 2, out
    gap = re.search(r"reloaded with plain transformers .*: max \|logit difference\| to the edited model in memory "
                    r"(\S+)", out)
    assert gap is not None and float(gap.group(1)) <= 1e-5, out
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()

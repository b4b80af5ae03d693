"""Issue 37 item 2: CPU evaluations run under the product mode chosen once per machine (cached, keyed by the machine's
facts, error-checked), which gives the default mode's numbers to fp32 rounding and never rounds to bf16."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from editing.core.errors import ConfigError
from editing.data.datamodule import TaskDataModule
from editing.evaluation import backend, products
from editing.evaluation.evaluator import Evaluator, evaluate


@pytest.fixture(autouse=True)
def _small_choice(monkeypatch):
    """A cheap measurement (one small product) and a fresh memo: every test sees only its own choices."""
    monkeypatch.setattr(products, "SMOLLM2_SHAPES", [((64, 96, 128), 1.0)])
    monkeypatch.setattr(products, "TIMING_REPEAT", 1)
    monkeypatch.setenv("EDITING_PRODUCTS", "auto")
    monkeypatch.delenv("EDITING_EVAL_CACHES", raising=False)
    products.forget_choices()
    yield
    products.forget_choices()


def _counting_measure(monkeypatch) -> list[str]:
    calls: list[str] = []
    original = products.measure_choice

    def counted():
        choice = original()
        calls.append(choice.mode)
        return choice

    monkeypatch.setattr(products, "measure_choice", counted)
    return calls


@contextmanager
def _fake_bf16():
    # "faster", but rounds the inputs to bf16 as oneDNN's bf16 math mode does on an AMX CPU
    original = torch.nn.functional.linear
    torch.nn.functional.linear = lambda x, w, b=None: original(x.bfloat16().float(), w.bfloat16().float(), b)
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def _datamodule(module) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", eval_limit=3, general_limit=4)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def test_evaluations_run_their_products_under_the_chosen_mode(tiny_module, data_root, monkeypatch) -> None:
    active: list[bool] = [False]
    seen: list[bool] = []

    @contextmanager
    def recorded():
        active[0] = True
        try:
            yield
        finally:
            active[0] = False

    monkeypatch.setitem(backend.MODES, "recorded", recorded)
    monkeypatch.setenv("EDITING_PRODUCTS", "recorded")
    module = tiny_module("tiny-llama")
    handle = module.model.register_forward_pre_hook(lambda m, args: seen.append(active[0]))
    try:
        dm = _datamodule(module)
        evaluate(module, dm, roles=["general"])  # Evaluator.run: editing evaluate, the callback's epochs
        assert seen and all(seen), "every forward pass of Evaluator.run runs under the chosen mode"
        seen.clear()
        batch = next(iter(dm.eval_dataloader("general")))  # Evaluator.update alone: Lightning's validation step
        Evaluator(dm.task).update(module.model, {**batch, "position": "general/0"})
        assert seen == [True], "Evaluator.update runs under the chosen mode"
    finally:
        handle.remove()
    assert not active[0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_every_exact_mode_and_the_choice_give_the_default_numbers(tiny_module, data_root, monkeypatch, name) -> None:
    module = tiny_module(name)
    dm = _datamodule(module)
    summaries = {}
    exact = [m for m, (_, ok) in backend.check_errors().items() if ok]
    assert "default" in exact
    for mode in [*exact, "auto"]:
        monkeypatch.setenv("EDITING_PRODUCTS", mode)
        summaries[mode] = evaluate(module, dm)
    reference = summaries["default"]
    for mode, summary in summaries.items():
        for metric in ("general_nll", "targeted_nll", "hard_negative_nll", "success_rate"):
            if reference[metric] is not None:
                assert _rel(summary[metric], reference[metric]) <= 1e-6, (mode, metric)
        assert [e["failed"] for e in summary["per_example"]] == [e["failed"] for e in reference["per_example"]]
        for a, b in zip(summary["per_example"], reference["per_example"], strict=True):
            assert a["index"] == b["index"] and _rel(a["score"], b["score"]) <= 1e-6, (mode, a, b)


def test_a_mode_that_rounds_to_bf16_is_never_used(monkeypatch) -> None:
    monkeypatch.setitem(backend.MODES, "fake-bf16", _fake_bf16)
    original = backend.choose_mode
    monkeypatch.setattr(backend, "choose_mode", lambda *a, **k: original(*a, **k, faster={"fake-bf16": 0.0}))
    assert products.chosen_mode() != "fake-bf16"  # it would win on speed
    record = json.loads(products.choice_path(products.choice_material()).read_text())
    assert record["rejected"]["fake-bf16"] > 1e-4 and "fake-bf16" not in record["exact"]
    monkeypatch.setenv("EDITING_PRODUCTS", "fake-bf16")
    with pytest.raises(ConfigError, match="EDITING_PRODUCTS='fake-bf16' rounds"):
        products.chosen_mode()
    monkeypatch.setenv("EDITING_PRODUCTS", "nosuch")
    with pytest.raises(ConfigError, match="not a product mode; use auto or one of"):
        products.chosen_mode()


def test_the_choice_is_measured_once_then_read_from_its_file(monkeypatch) -> None:
    calls = _counting_measure(monkeypatch)
    first = products.chosen_mode()
    assert calls == [first]
    products.chosen_mode()  # the same process: the memo
    products.forget_choices()  # a new process: the file
    assert products.chosen_mode() == first and calls == [first]
    assert products.chosen_mode("meta") == "default"  # off the CPU: no mode, nothing measured
    assert len(calls) == 1


@pytest.mark.parametrize("fact, value", [("flags", "other flags amx_tile"), ("cpu", "Another CPU"),
                                         ("torch", "9.9.9+cpu"), ("threads", 7)])
def test_the_key_covers_every_machine_fact(monkeypatch, fact, value) -> None:
    calls = _counting_measure(monkeypatch)
    products.chosen_mode()
    here = products.choice_path(products.choice_material())
    cpu, flags = products._cpu_info()
    if fact == "flags":
        monkeypatch.setattr(products, "_cpu_info", lambda: (cpu, value))
    elif fact == "cpu":
        monkeypatch.setattr(products, "_cpu_info", lambda: (value, flags))
    elif fact == "torch":
        monkeypatch.setattr(torch, "__version__", value)
    else:
        monkeypatch.setattr(torch, "get_num_threads", lambda: value)
    assert products.machine_facts()[fact] == value
    other = products.choice_path(products.choice_material())
    assert other != here
    products.chosen_mode()  # another machine: measured again, not read from this one's file
    assert len(calls) == 2 and other.is_file() and here.is_file()


@pytest.mark.parametrize("damage", ["not json", "format", "material", "unknown mode", "mode it refused",
                                    "mode it counts as inexact", "nan timing"])
def test_a_bad_choice_file_is_rejected_and_measured_again(monkeypatch, damage) -> None:
    calls = _counting_measure(monkeypatch)
    mode = products.chosen_mode()
    path = products.choice_path(products.choice_material())
    record = json.loads(path.read_text())
    if damage == "not json":
        path.write_text('{"format": "canonical-editing product ch')
    else:
        if damage == "format":
            record["format"] = "something else"
        elif damage == "material":
            record["material"]["facts"]["flags"] = "a flag string from another machine"
        elif damage == "unknown mode":
            record["mode"] = "nosuch"
        elif damage == "mode it refused":
            record["mode"] = "fpmath-bf16"
            record["rejected"] = {"fpmath-bf16": 2.3e-3}
        elif damage == "mode it counts as inexact":
            record["exact"] = [m for m in record["exact"] if m != mode]
        else:
            record["seconds"][mode] = float("nan")
        path.write_text(json.dumps(record))
    products.forget_choices()
    assert products.chosen_mode() == calls[-1] and len(calls) == 2, damage
    assert products.read_choice(path, products.choice_material()) == calls[-1]  # replaced by a good record


def test_with_caches_off_each_process_measures_and_writes_nothing(tiny_module, data_root, monkeypatch) -> None:
    calls = _counting_measure(monkeypatch)
    module = tiny_module("tiny-llama")
    dm = _datamodule(module)
    on = evaluate(module, dm)
    path = products.choice_path(products.choice_material())
    stored = path.read_bytes()
    monkeypatch.setenv("EDITING_EVAL_CACHES", "off")
    for _ in range(2):
        products.forget_choices()
        off = evaluate(module, dm)
    assert len(calls) == 3, "caches off: measured afresh in each process, the file not read"
    assert path.read_bytes() == stored, "caches off: the file is not written"
    for metric in ("general_nll", "targeted_nll", "success_rate"):
        assert _rel(on[metric], off[metric]) <= 1e-6

"""Typed names: loss types and methods are enums; a misspelt name fails at once with the valid values listed."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from editing.core.errors import ConfigError
from editing.core.types import LossType, MethodName
from editing.methods.registry import METHODS
from editing.methods.senses.selection import slot_signs
from editing.rules.losses import example_score, training_loss
from editing.rules.tasks import BUILTIN_TASKS, TaskSpec, load_task_yaml


def test_loss_types_are_the_four_of_the_spec() -> None:
    assert [m.value for m in LossType] == ["good", "bad", "balance", "good-v-bad"]
    assert [m for m in LossType if m.pair] == [LossType.BALANCE, LossType.GOOD_V_BAD]
    assert LossType("good-v-bad") is LossType.GOOD_V_BAD and LossType(LossType.BAD) is LossType.BAD
    # plain strings in files: JSON and YAML see the value
    assert json.dumps({"loss": LossType.GOOD_V_BAD}) == '{"loss": "good-v-bad"}'
    assert yaml.safe_dump({"method": MethodName.LORA.value}) == "method: lora\n"
    assert f"{LossType.GOOD_V_BAD}" == "good-v-bad"


@pytest.mark.parametrize("name", ["good_v_bad", "Good", "goodvbad", "", None, 3])
def test_unknown_loss_name_is_a_config_error_listing_the_valid_ones(name) -> None:
    with pytest.raises(ConfigError, match="expected one of good, bad, balance, good-v-bad"):
        LossType(name)


@pytest.mark.parametrize("call", [
    lambda: example_score(torch.zeros(2, 2), "good_v_bad"),
    lambda: training_loss(torch.zeros(2, 2), "balanced"),
    lambda: slot_signs("good_v_bad", 2),
    lambda: TaskSpec("t", "good_v_bad", 1.0, "c.jsonl", "e.jsonl"),
])
def test_every_function_taking_a_loss_rejects_a_misspelling(call) -> None:
    with pytest.raises(ConfigError, match="good-v-bad"):
        call()


def test_slot_signs_follow_spec_section_8() -> None:
    assert slot_signs("good", 1) == [1.0] and slot_signs(LossType.BAD, 1) == [1.0]
    assert slot_signs("balance", 2) == [1.0, 1.0]
    assert slot_signs("good-v-bad", 2) == [1.0, -1.0]
    with pytest.raises(ConfigError, match="expects 2 suffix"):
        slot_signs("good-v-bad", 1)


def test_tasks_carry_typed_losses() -> None:
    assert {name: task.loss for name, task in BUILTIN_TASKS.items()} == {
        "country_capital": LossType.GOOD, "company_ceo": LossType.GOOD, "temporal": LossType.GOOD,
        "stereoset": LossType.BAD, "pronoun_gender_bias": LossType.BALANCE, "verb_conjugation": LossType.GOOD_V_BAD}
    assert all(isinstance(t.loss, LossType) for t in BUILTIN_TASKS.values())
    assert TaskSpec("t", "balance", 1.0, "c.jsonl", "e.jsonl").loss is LossType.BALANCE


def test_task_yaml_with_a_misspelt_loss_names_the_file_field_and_valid_values(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("loss: good_v_bad\nthreshold: 1.0\ncanonical: c.jsonl\nevaluation: e.jsonl\n")
    with pytest.raises(ConfigError) as info:
        load_task_yaml(path)
    message = str(info.value)
    assert str(path) in message and "'loss'" in message and "'good_v_bad'" in message
    assert "good, bad, balance, good-v-bad" in message
    path.write_text("loss: good-v-bad\nthreshold: 1.0\ncanonical: c.jsonl\nevaluation: e.jsonl\n")
    assert load_task_yaml(path).loss is LossType.GOOD_V_BAD


def test_methods_are_typed_and_registered_under_their_name() -> None:
    assert set(MethodName) - {MethodName.NONE} <= set(METHODS)
    for name, spec in METHODS.items():
        assert isinstance(spec.module.method, MethodName) and spec.module.method is name
    with pytest.raises(ConfigError, match="expected one of none, full, lora, senses, memit"):
        MethodName("nosuch")

"""Combining saved edits (``editing apply --edit A --edit B``, ``editing.edits.combine``): tensor edits of one method
add, LoRA adapters add through peft, sense edits merge, and two methods changing one tensor are refused. The references
are written here: the base model's weights plus each edit's delta read from its files."""

from __future__ import annotations

import json

import pytest
import torch
from edit_kinds import make_edit
from safetensors.torch import load_file

from editing.cli import main
from editing.core.errors import ConfigError
from editing.edits.combine import combine_edits
from editing.models.loading import ModelConfig, load_model

IDS = torch.tensor([[464, 3139, 286, 4881, 318, 6342, 13, 383]])


def base_params(name: str = "tiny-gpt2") -> dict[str, torch.Tensor]:
    model = load_model(ModelConfig(name=name, precision="fp32")).model
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method, first, second", [
    ("full", {"tensors": ("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight")},
     {"tensors": ("transformer.h.1.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight")}),
    ("memit", {"layers": (0, 1)}, {"layers": (1,)}),
])
def test_two_tensor_edits_of_one_method_add_their_deltas(method, first, second, tmp_path) -> None:
    a = make_edit(method, tmp_path / "a", seed=1, scale=0.05, **first)
    b = make_edit(method, tmp_path / "b", seed=2, scale=0.05, **second)
    base = base_params()
    new_a, new_b = load_file(str(a / "edit.safetensors")), load_file(str(b / "edit.safetensors"))
    assert set(new_a) & set(new_b)  # the two edits share a tensor: its deltas must add
    module, _ = combine_edits([a, b])
    got = dict(module.model.named_parameters())
    for name, value in base.items():
        want = value.clone()
        for new in (new_a, new_b):
            if name in new:
                want += new[name] - value
        torch.testing.assert_close(got[name].detach(), want, atol=1e-6, rtol=0, msg=name)
        if name not in new_a and name not in new_b:
            assert torch.equal(got[name], value), name
    with module.reference() as model:  # p0: every edit off, bit for bit
        for name, value in model.named_parameters():
            assert torch.equal(value, base[name]), name
    shared = sorted(set(new_a) & set(new_b))[0]
    assert not torch.allclose(got[shared], new_a[shared]) and not torch.allclose(got[shared], new_b[shared])


def lora_reference(folders, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base weights plus (alpha / r) * B @ A of every adapter module of every edit."""
    weights = {n: v.clone() for n, v in base.items()}
    for folder in folders:
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            delta = scale * tensors[key.replace(".lora_A.", ".lora_B.")] @ a  # (out, in)
            weight = weights[f"{module}.weight"]
            weights[f"{module}.weight"] = weight + (delta if weight.shape == delta.shape else delta.T)
    return weights


def test_two_lora_adapters_are_both_active_and_add(tmp_path) -> None:
    a = make_edit("lora", tmp_path / "a", seed=1)
    b = make_edit("lora", tmp_path / "b", seed=2)
    base = base_params()
    reference = load_model(ModelConfig(name="tiny-gpt2", precision="fp32")).model
    with torch.no_grad():
        for name, value in lora_reference([a, b], base).items():
            dict(reference.named_parameters())[name].copy_(value)
        want = reference(IDS).logits
        only_a = lora_reference([a], base)
    module, _ = combine_edits([a, b])
    from peft import PeftModel

    assert isinstance(module.model, PeftModel)
    with torch.no_grad():
        got = module.model(input_ids=IDS).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            for name, value in only_a.items():
                dict(reference.named_parameters())[name].copy_(value)
        assert not torch.allclose(got, reference(IDS).logits, atol=1e-4)  # b's adapter is active too
        with module.reference() as model:
            plain = load_model(ModelConfig(name="tiny-gpt2", precision="fp32")).model
            assert torch.equal(model(input_ids=IDS).logits, plain(IDS).logits)


def test_sense_edits_merge_and_shared_pairs_add(tmp_path, data_root) -> None:
    a = make_edit("senses", tmp_path / "a", seed=1, data_root=data_root)
    b = make_edit("senses", tmp_path / "b", seed=2, data_root=data_root)
    want: dict[tuple[int, int], torch.Tensor] = {}
    for folder in (a, b):
        t = load_file(str(folder / "senses.safetensors"))
        for w, s, v in zip(t["vocab_ids"].tolist(), t["sense_ids"].tolist(), t["vectors"], strict=True):
            want[(w, s)] = want.get((w, s), torch.zeros_like(v)) + v
    module, _ = combine_edits([a, b])
    from editing.models.architecture import backpack_of

    deltas = backpack_of(module.model).sense_edit
    got = {(w, s): deltas.vectors[i].detach() for i, (w, s) in
           enumerate(zip(deltas.vocab_ids.tolist(), deltas.sense_ids.tolist(), strict=True))}
    assert got.keys() == want.keys()
    for pair, vector in want.items():
        torch.testing.assert_close(got[pair], vector, atol=1e-6, rtol=0)
    with module.reference():
        assert backpack_of(module.model).sense_edit is None


def test_two_methods_changing_one_tensor_are_refused(tmp_path) -> None:
    full = make_edit("full", tmp_path / "full", tensors=("transformer.h.1.mlp.c_proj.weight",), scale=0.05)
    memit = make_edit("memit", tmp_path / "memit", layers=(1,), scale=0.05)  # GPT-2's down projection: mlp.c_proj
    with pytest.raises(ConfigError) as info:
        combine_edits([full, memit])
    message = str(info.value)
    assert str(full) in message and str(memit) in message and "transformer.h.1.mlp.c_proj.weight" in message
    assert "(full)" in message and "(memit)" in message
    lora = make_edit("lora", tmp_path / "lora")
    fc = make_edit("full", tmp_path / "fc", tensors=("transformer.h.1.mlp.c_fc.weight",), scale=0.05)
    with pytest.raises(ConfigError, match=r"both change tensor transformer\.h\.1\.mlp\.c_fc\.weight"):
        combine_edits([lora, fc])
    # different tensors: allowed
    elsewhere = make_edit("full", tmp_path / "elsewhere", tensors=("transformer.h.0.attn.c_attn.weight",), scale=0.05)
    combine_edits([elsewhere, memit])
    with pytest.raises(ConfigError, match="given twice"):
        combine_edits([full, tmp_path / "full"])
    llama = make_edit("full", tmp_path / "llama", tensors=("model.layers.0.mlp.up_proj.weight",), scale=0.05,
                      model="tiny-llama")
    with pytest.raises(ConfigError, match="different base models"):
        combine_edits([full, llama])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_copied_edit_folder_is_the_same_edit_and_is_refused(kind, tmp_path) -> None:
    """Issue 34 item 13: ``cp -r A A_copy`` then ``--edit A --edit A_copy`` would apply one edit twice; edits are
    compared by their content (tensors and adapter config), not by their path."""
    import shutil

    options = {"tensors": ("transformer.h.0.mlp.c_fc.weight",), "scale": 0.05} if kind == "full" else {}
    a = make_edit(kind, tmp_path / "A", **options)
    copy = tmp_path / "elsewhere" / "A_copy"
    shutil.copytree(a, copy)
    with pytest.raises(ConfigError) as info:
        combine_edits([a, copy])
    message = str(info.value)
    assert str(a) in message and str(copy) in message and "same edit" in message and "give each edit once" in message
    other = make_edit(kind, tmp_path / "B", seed=7, **options)  # another edit of the same method still combines
    combine_edits([a, other])


def test_apply_with_two_edits_records_each_task_and_the_joint_degradation(tmp_path, capsys) -> None:
    a = make_edit("full", tmp_path / "a", tensors=("transformer.h.0.mlp.c_fc.weight",), scale=0.2)
    b = make_edit("lora", tmp_path / "b", seed=3)
    limits = ["--eval_limit", "4", "--general_limit", "4"]
    main(["apply", "--edit", str(a), "--task", "country_capital", "--edit", str(b), "--task", "company_ceo", *limits,
          "--output_dir", str(tmp_path / "both")])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "both" / "combined.json").read_text())
    assert [t["task"] for t in record["tasks"]] == ["country_capital", "company_ceo"]
    assert [e["method"] for e in record["edits"]] == ["full", "lora"]
    assert "joint degradation" in out and "success combined" in out
    base_nll, combined_nll = record["base_general_nll"], record["combined_general_nll"]
    assert record["joint_degradation"] == pytest.approx(combined_nll / base_nll - 1, rel=1e-12)
    assert record["joint_degradation"] != 0
    for outcome, folder in zip(record["tasks"], (a, b), strict=True):
        # alone and base: what `editing apply` of that edit alone reports
        main(["apply", "--edit", str(folder), "--task", outcome["task"], *limits, "--output_dir",
              str(tmp_path / outcome["task"])])
        single = json.loads((tmp_path / outcome["task"] / "evaluation.json").read_text())
        base = json.loads((tmp_path / outcome["task"] / "base" / "evaluation.json").read_text())
        for metric in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
            assert outcome["alone"][metric] == pytest.approx(single["metrics"][metric], rel=1e-9), metric
            assert outcome["base"][metric] == pytest.approx(base["metrics"][metric], rel=1e-9), metric
        assert outcome["combined"]["general_nll"] == pytest.approx(combined_nll, rel=1e-12)  # one general set
        assert outcome["combined"]["degradation"] == pytest.approx(record["joint_degradation"], rel=1e-12)


def test_apply_of_one_edit_prints_base_edited_and_change(tmp_path, capsys, tiny_module) -> None:
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate

    edit = make_edit("full", tmp_path / "a", tensors=("transformer.h.0.mlp.c_fc.weight",), scale=0.2)
    main(["apply", "--edit", str(edit), "--task", "country_capital", "--eval_limit", "4", "--general_limit", "4",
          "--output_dir", str(tmp_path / "out")])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "metric" not in line}
    edited = json.loads((tmp_path / "out" / "evaluation.json").read_text())["metrics"]
    base = json.loads((tmp_path / "out" / "base" / "evaluation.json").read_text())["metrics"]
    # the base column is the unedited model's own evaluation
    plain = evaluate(tiny_module("tiny-gpt2"), TaskDataModule(task="country_capital", eval_limit=4, general_limit=4))
    for metric in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
        assert base[metric] == pytest.approx(plain[metric], rel=1e-9), metric
        b, e, change = rows[metric]
        assert float(b) == pytest.approx(base[metric], rel=1e-5) and float(e) == pytest.approx(edited[metric], rel=1e-5)
        assert float(change) == pytest.approx(edited[metric] - base[metric], rel=1e-4, abs=1e-9)
    assert edited["general_nll"] != base["general_nll"]
    assert float(rows["degradation"][1]) == pytest.approx(edited["general_nll"] / base["general_nll"] - 1, rel=1e-4)

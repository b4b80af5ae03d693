"""Issue 37 item 3: a LoRA edit's evaluation with the adapter merged into its weights (W + scale * B A once) gives
the branch's numbers to fp32 rounding, runs no rank-r branch, and leaves the base weights bit-identical."""

from __future__ import annotations

import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation.caching import evaluate_epoch
from editing.evaluation.evaluator import evaluate
from editing.methods.base import RegularizationConfig
from editing.methods.lora import LoRAConfig, LoRAEditor
from editing.models.loading import ModelConfig


def _module() -> LoRAEditor:
    module = LoRAEditor(ModelConfig(name="tiny-llama", precision="fp32"), lora=LoRAConfig(rank=4, layer_fraction=1.0),
                        regularization=RegularizationConfig(kind="none"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero: give the adapter an effect the merge must reproduce
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def _datamodule(module) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", eval_limit=6, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def _base_weights(module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.model.named_parameters() if "lora_" not in n}


def _branch_calls(module) -> list[str]:
    calls: list[str] = []
    for name, sub in module.model.named_modules():
        if name.endswith("lora_A.default"):
            sub.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    return calls


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b), 1e-30)


def test_merged_evaluation_equals_the_branch_and_restores_the_base_bit_for_bit(data_root) -> None:
    module = _module()
    dm = _datamodule(module)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in _base_weights(module).items()}
    calls = _branch_calls(module)
    branch = evaluate(module, dm)
    assert calls, "the unmerged evaluation runs the LoRA branch"
    calls.clear()
    with module.evaluation_weights():
        merged = evaluate(module, dm)
    assert calls == [], "a merged evaluation runs no rank-r branch"
    for name in ("general_nll", "targeted_nll", "success_rate", "hard_negative_nll"):
        if branch[name] is not None:
            assert _close(branch[name], merged[name]), (name, branch[name], merged[name])
    assert len(branch["per_example"]) == len(merged["per_example"]) > 0
    for a, b in zip(branch["per_example"], merged["per_example"], strict=True):
        assert a["index"] == b["index"] and _close(a["score"], b["score"])
    for name, p in _base_weights(module).items():  # the very tensor, with its very bits
        assert p.data_ptr() == before[name][0] and torch.equal(p.detach(), before[name][1]), name
    again = evaluate(module, dm)  # the branch is back
    assert calls and again["general_nll"] == branch["general_nll"]


def test_an_epoch_evaluation_merges_and_p0_does_not(data_root, monkeypatch) -> None:
    monkeypatch.setenv("EDITING_EVAL_CACHES", "off")
    module = _module()
    dm = _datamodule(module)
    calls = _branch_calls(module)
    evaluate_epoch(module, dm, 1, announce=False)
    assert calls == [], "an epoch's evaluation of a LoRA edit merges the adapter"
    evaluate_epoch(module, dm, 0, announce=False)
    assert calls, "p0 (epoch 0) takes the path it always took"

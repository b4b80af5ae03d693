"""Issue 37: inside a product mode, transformers' ``sdpa`` attention runs in IEEE fp32 while the linear layers take
the mode, and the evaluation's numbers are those of a float64 computation to fp32 rounding."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation import attention, products
from editing.evaluation.evaluator import evaluate


def _settings() -> tuple[str, str]:
    return torch.backends.mkldnn.matmul.fp32_precision, torch.get_float32_matmul_precision()


@contextmanager
def _lowered():
    """A product mode that lowers both global fp32 switches (what oneDNN's bf16 mode and torch's 'medium' set)."""
    before = _settings()
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before[0]
        torch.set_float32_matmul_precision(before[1])


def _registry() -> dict:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS._global_mapping


def _datamodule(module, general_limit: int = 4) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", eval_limit=2, general_limit=general_limit)
    dm.attach(module.tokenizer, module.max_length)
    return dm


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-neox"])
def test_attention_sees_ieee_and_the_linear_layers_the_mode(tiny_module, data_root, monkeypatch, name) -> None:
    monkeypatch.setitem(products.backend.MODES, "lowered", _lowered)
    monkeypatch.setattr(products, "chosen_mode", lambda device="cpu": "lowered")
    original = _registry()[attention.NAME]
    at_attention: list[tuple[str, str]] = []

    def spy(*args, **kwargs):
        at_attention.append(_settings())
        return original(*args, **kwargs)

    monkeypatch.setitem(_registry(), attention.NAME, spy)
    module = tiny_module(name)
    at_linear: list[tuple[str, str]] = []
    linear = next(m for m in module.model.modules() if isinstance(m, torch.nn.Linear))
    handle = linear.register_forward_pre_hook(lambda m, args: at_linear.append(_settings()))
    try:
        evaluate(module, _datamodule(module), roles=["general"])
    finally:
        handle.remove()
    assert at_attention and all(s == ("ieee", "highest") for s in at_attention), at_attention[:3]
    assert at_linear and all(s == ("bf16", "medium") for s in at_linear), at_linear[:3]
    assert _registry()[attention.NAME] is spy, "the registry's entry is put back on leaving"


def test_the_default_mode_leaves_attention_alone_and_nesting_wraps_once(monkeypatch) -> None:
    original = _registry()[attention.NAME]
    with attention.attention_at_ieee(False) as swapped:
        assert not swapped and _registry()[attention.NAME] is original
    with attention.attention_at_ieee() as swapped:
        outer = _registry()[attention.NAME]
        assert swapped and outer is not original and outer.ieee_of is original
        with attention.attention_at_ieee() as inner_swapped:
            assert inner_swapped and _registry()[attention.NAME] is outer
        assert _registry()[attention.NAME] is outer
    assert _registry()[attention.NAME] is original
    with pytest.raises(RuntimeError), attention.attention_at_ieee():
        raise RuntimeError("an evaluation that fails")
    assert _registry()[attention.NAME] is original


def _float64_general_nll(model, dm) -> float:
    """Token-mean NLL of G by SPEC section 5, from a float64 copy of the model: a plain loop over each scored token's
    log-sum-exp."""
    import copy

    double = copy.deepcopy(model).double().eval()
    total, count = 0.0, 0
    for batch in dm.eval_dataloader("general"):
        with torch.no_grad():
            logits = double(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row in range(logits.shape[0]):
            for pos in range(logits.shape[1]):
                target = int(batch["labels"][row, pos])  # the token position pos predicts (scorer.token_nll)
                if target == -100:
                    continue
                values = logits[row, pos].tolist()
                top = max(values)
                lse = top + math.log(sum(math.exp(v - top) for v in values))
                total += lse - values[target]
                count += 1
    return total / count


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_mode_with_attention_at_ieee_measures_general_nll_as_float64_does(tiny_module, data_root, monkeypatch,
                                                                            name) -> None:
    # mkldnn-off is exact on every CPU, and not "default": the swap is in effect
    monkeypatch.setattr(products, "chosen_mode", lambda device="cpu": "mkldnn-off")
    module = tiny_module(name)
    dm = _datamodule(module)
    summary = evaluate(module, dm, roles=["general"])
    reference = _float64_general_nll(module.model, dm)
    assert abs(summary["general_nll"] - reference) <= 1e-6 * reference

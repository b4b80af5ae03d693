"""Issue 37: the product mode ``mkl-packed`` runs an evaluation's linear layers (and a linear LM head) through MKL's
packed weights, packed after a LoRA adapter is merged, gives the default mode's numbers to fp32 rounding, and puts
every layer back on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from editing.data.datamodule import TaskDataModule
from editing.evaluation import backend, packed, products
from editing.evaluation.evaluator import evaluate
from editing.methods.base import RegularizationConfig
from editing.methods.lora import LoRAConfig, LoRAEditor
from editing.models.loading import ModelConfig

pytestmark = pytest.mark.skipif(not backend.packing_available(), reason="this torch has no MKL packed linear")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    products.forget_choices()
    yield
    products.forget_choices()


def _plain_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T + b in float64 by a loop over output features (SPEC's linear layer), as fp32."""
    out = torch.zeros(*x.shape[:-1], w.shape[0], dtype=torch.float64)
    for j in range(w.shape[0]):
        out[..., j] = (x.double() * w[j].double()).sum(-1) + (0.0 if b is None else float(b[j]))
    return out


@pytest.mark.parametrize("rows", [1, 7, 300, 1500])
def test_packed_product_is_the_linear_layer(rows) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 48, generator=gen), torch.randn(40, 48, generator=gen), torch.randn(40, generator=gen)
    got = backend.packed_product(x, w, backend.pack(w), b)
    torch.testing.assert_close(got.double(), _plain_linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert backend.packed_product(x[:0], w, backend.pack(w), b).shape == (0, 40)  # the head's empty slice


def test_packed_linears_patch_plain_fp32_linears_and_put_them_back() -> None:
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 6), Sub(6, 6), nn.Linear(6, 4).double(), nn.Linear(4, 3, bias=False))
    x = torch.randn(5, 8)
    with torch.no_grad():
        before = model[3](model[2](model[1](model[0](x)).double()).float())
        with packed.packed_linears(model) as count:
            assert count == 2  # the subclass keeps its own forward, the float64 layer is not fp32
            assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
            inside = model[3](model[2](model[1](model[0](x)).double()).float())
        assert all("forward" not in m.__dict__ for m in model)
    torch.testing.assert_close(inside, before, rtol=1e-6, atol=1e-6)
    with packed.packed_linears(model, enabled=False) as count:
        assert count == 0


def _lora_module() -> LoRAEditor:
    module = LoRAEditor(ModelConfig(name="tiny-llama", precision="fp32"), lora=LoRAConfig(rank=4, layer_fraction=1.0),
                        regularization=RegularizationConfig(kind="none"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module


def test_a_packed_evaluation_of_a_merged_lora_edit_equals_the_default(data_root, monkeypatch) -> None:
    """Packed after the merge: the merged weights' numbers (a pack of the unmerged ones would miss the edit)."""
    module = _lora_module()
    dm = TaskDataModule(task="country_capital", eval_limit=6, general_limit=8)
    dm.attach(module.tokenizer, module.max_length)
    calls = []
    real = backend.packed_product
    monkeypatch.setattr(backend, "packed_product", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    summaries = {}
    for mode in ("default", backend.PACKED):
        monkeypatch.setenv("EDITING_PRODUCTS", mode)
        products.forget_choices()
        with module.evaluation_weights():
            summaries[mode] = evaluate(module, dm)
    assert sum(n > 0 for n in calls) > 0, "the packed mode ran no packed product"
    base = summaries["default"]
    with module.model.disable_adapter():  # the edit moves the numbers, so a pack that missed it would show
        unedited = evaluate(module, dm)
    assert unedited["general_nll"] != pytest.approx(base["general_nll"], rel=1e-4)
    for metric in ("general_nll", "targeted_nll", "hard_negative_nll", "success_rate"):
        if base[metric] is not None:
            assert summaries[backend.PACKED][metric] == pytest.approx(base[metric], rel=1e-6, abs=0), metric
    for a, b in zip(summaries[backend.PACKED]["per_example"], base["per_example"], strict=True):
        assert a["failed"] == b["failed"] and a["score"] == pytest.approx(b["score"], rel=1e-6)

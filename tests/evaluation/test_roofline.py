"""Issue 37 item 1: ``benchmarks/roofline.py`` counts a pass's FLOPs as torch's own FLOP counter does, excludes every
product way that is not exact to fp32, attributes a profiled pass's operators to their parts, and prints the CPU with
the fraction of the limit."""

from __future__ import annotations

import pytest
import torch
from fakes import benchmark_module
from torch.utils.flop_counter import FlopCounterMode

from editing.evaluation import backend


@pytest.fixture(scope="module")
def roofline():
    with benchmark_module("roofline") as module:
        yield module


def test_the_pass_flops_are_torchs_own_count(roofline, tiny_module) -> None:
    model = tiny_module("tiny-llama").model
    head = model.get_output_embeddings().weight
    vocab, d = head.shape
    t = 37
    ids = torch.randint(0, vocab, (1, t), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        torch.nn.functional.linear(hidden, head)  # the head at every position (all scored)
    counts = counter.get_flop_counts()["Global"]
    products = sum(n for op, n in counts.items() if "mm" in str(op))  # linear layers and the head, not attention
    ours = roofline.pass_flops(roofline.model_products(model), d, vocab, model.config.num_hidden_layers, [(t, t)])
    assert ours["linear"] + ours["head"] == products
    assert ours["head"] == 2 * t * d * vocab


def test_a_way_that_rounds_to_bf16_is_excluded_from_the_limit(roofline) -> None:
    def candidates(x, w):
        return {"F.linear [default]": lambda: torch.nn.functional.linear(x, w),
                "rounds to bf16": lambda: torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float(),
                "transposed": lambda: torch.mm(x, w.t().contiguous())}

    found = roofline.measure_ways(32, 64, 96, 1, candidates)
    assert found["F.linear [default]"].exact and found["transposed"].exact
    assert not found["rounds to bf16"].exact and found["rounds to bf16"].error > 1e-4
    assert found["rounds to bf16"].seconds != found["rounds to bf16"].seconds  # NaN: never timed, never the limit
    for name in roofline.ways(torch.randn(8, 16), torch.randn(24, 16)):
        assert name.startswith("F.linear [") or "mm" in name or "MKL" in name or "oneDNN" in name
    listed = set(roofline.ways(torch.randn(8, 16), torch.randn(24, 16)))
    assert {f"F.linear [{m}]" for m in backend.MODES if m != backend.PACKED} <= listed
    assert not backend.packing_available() or ("MKL packed linear" in listed and "F.linear [mkl-packed]" not in listed)


def test_the_profile_puts_each_operator_in_its_part(roofline, data_root) -> None:
    from torch.profiler import ProfilerActivity, profile

    from editing.data.datamodule import TaskDataModule
    from editing.evaluation.evaluator import evaluate

    class Args:
        model, lora = "tiny-llama", 4

    module = roofline._subject(Args)
    dm = TaskDataModule(task="country_capital", general_limit=3)
    dm.attach(module.tokenizer, module.max_length)
    with roofline.labelled(module.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        evaluate(module, dm, roles=["general"])
    seconds = roofline.profile_shares(prof.events(), wall=10.0)
    for part in ("matmuls", "attention", "norms and activations", "head and log-sum-exp", "LoRA branches"):
        assert seconds[part] > 0, part
    assert abs(sum(seconds.values()) - 10.0) < 1e-9
    assert roofline.category("aten::mm", ["range:linear", "range:lora", "range:attention"]) == "LoRA branches"
    assert roofline.category("aten::mm", ["range:linear", "range:attention"]) == "matmuls"
    assert roofline.category("aten::_scaled_dot_product_flash_attention_for_cpu", ["range:attention"]) == "attention"
    assert roofline.category("aten::logsumexp", ["range:head"]) == "head and log-sum-exp"
    assert roofline.category("aten::silu", ["range:mlp"]) == "norms and activations"


def test_the_benchmark_prints_the_cpu_and_the_fraction_of_the_limit(roofline, data_root, capsys, monkeypatch) -> None:
    every = roofline.ways  # two of the ways (each one's listing is tested above): the test's time

    monkeypatch.setattr(roofline, "ways", lambda x, w: {k: v for k, v in every(x, w).items()
                                                        if k in ("F.linear [default]", "torch.mm(x, W^T contiguous)")})
    result = roofline.main(["--model", "tiny-llama", "--texts", "2", "--repeat", "1", "--threads", "1",
                            "--before", "1"])
    out = capsys.readouterr().out
    assert out.count("  before: ") == 1 and out.count("  today: ") == 1 and "x faster (medians" in out
    assert result["info"]["cpu"] in out and "avx512_bf16" in out and "amx_bf16" in out
    assert 0 < result["fraction"] and result["limit"] > 0
    assert f"fraction of the limit: {result['fraction']:.3f}" in out
    assert all(name in out for name in roofline.CATEGORIES)


def test_before_puts_the_removed_overheads_back_and_restores_them(roofline) -> None:
    """``--before`` times the evaluator as it was: the mask kept and the log-sum-exp unchunked, then today's again."""
    import editing.evaluation.scorer as scorer
    from editing.evaluation import products

    mask = torch.tensor([[1, 1, 0]])
    today = scorer.LSE_BYTES_PER_THREAD
    with roofline.overheads_back():
        assert scorer.needed_mask(mask) is mask
        assert scorer.LSE_BYTES_PER_THREAD >= 1 << 40
        with products.attention_at_ieee(True) as swapped:
            assert not swapped, "the attention runs under the product mode, as before"
    assert scorer.needed_mask(mask) is None and scorer.LSE_BYTES_PER_THREAD == today
    with products.attention_at_ieee(True) as swapped:
        assert swapped

"""``benchmarks/train_precision.py`` (issue 37 item 4) runs the main job's LoRA steps under fp32 and bf16-mixed in
fresh processes and compares them: on a tiny model, both ran the same batches and their losses differ (autocast
changed the arithmetic) but stay close."""

from __future__ import annotations

import math

from fakes import benchmark_module


def test_both_precisions_train_the_same_batches(capsys) -> None:
    with benchmark_module("train_precision") as bench:
        result = bench.main(["--model", "tiny-llama", "--steps", "1", "--repeat", "1"])
    out = capsys.readouterr().out
    fp32, bf16 = (result["runs"][p][0] for p in bench.PRECISIONS)
    assert fp32["precision"] == "32-true" and bf16["precision"] == "bf16-mixed"
    assert len(fp32["losses"]) == len(bf16["losses"]) == 5  # one optimizer step of 5 accumulated batches
    assert 0 < result["loss_gap"] < 0.1 and math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert "bf16 units:" in out and "x the speed of fp32" in out

"""Scoring runs in full fp32 whatever the process set: no autocast (``--trainer.precision bf16-mixed``), no TF32 or
reduced float32 matmul precision; the settings are put back afterwards, and training keeps its autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.methods import EditingModule, LoRAConfig, LoRAEditor
from editing.methods.base import RegularizationConfig
from editing.models.loading import ModelConfig

TIMEOUT_S = 300
LIMITS = {"eval_limit": 6, "general_limit": 6}


def _settings() -> dict:
    """What a forward pass would run under."""
    out = {"matmul": torch.get_float32_matmul_precision(), "autocast": torch.is_autocast_enabled("cpu"),
           "cuda_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32}
    for name, obj in (("mkldnn_matmul", getattr(torch.backends.mkldnn, "matmul", None)),
                      ("cuda_matmul", torch.backends.cuda.matmul)):
        if obj is not None and hasattr(obj, "fp32_precision"):
            out[name] = obj.fp32_precision
    return out


FULL = {"matmul": "highest", "autocast": False, "cuda_tf32": False, "cudnn_tf32": False}


@pytest.fixture
def reduced_precision():
    """The process runs with 'medium' float32 matmuls and TF32 allowed, as a training script may set it."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    before = _settings()
    assert before["matmul"] == "medium" and before["cuda_tf32"]
    yield before
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def _record_forwards(model: torch.nn.Module, seen: list[dict]):
    return model.register_forward_pre_hook(lambda module, args: seen.append(
        {**_settings(), "grad": torch.is_grad_enabled()}))


def _assert_full_inside(seen: list[dict]) -> None:
    assert seen
    for settings in seen:
        assert {k: settings[k] for k in FULL} == FULL
        for name in ("mkldnn_matmul", "cuda_matmul"):
            if name in settings:
                assert settings[name] == "ieee"


def test_full_precision_restores_the_settings_and_nests(reduced_precision) -> None:
    from editing.evaluation.precision import full_precision

    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = torch.randn(4, 4)
        assert (w @ w).dtype == torch.bfloat16
        with full_precision():
            _assert_full_inside([_settings()])
            assert (w @ w).dtype == torch.float32
            with full_precision():
                _assert_full_inside([_settings()])
            _assert_full_inside([_settings()])
        assert (w @ w).dtype == torch.bfloat16
    assert _settings() == reduced_precision
    with pytest.raises(RuntimeError, match="boom"), full_precision():
        raise RuntimeError("boom")
    assert _settings() == reduced_precision


def test_evaluate_runs_in_full_precision_and_restores_it(reduced_precision, tiny_module, data_root) -> None:
    module = tiny_module("tiny-gpt2")
    seen: list[dict] = []
    handle = _record_forwards(module.model, seen)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            evaluate(module, TaskDataModule(task="stereoset", **LIMITS))
    finally:
        handle.remove()
    _assert_full_inside(seen)
    assert _settings() == reduced_precision


def test_lightning_validate_under_bf16_mixed_scores_in_fp32(reduced_precision, tiny_module, data_root) -> None:
    module = EditingModule(ModelConfig(name="tiny-gpt2", precision="fp32"))
    seen: list[dict] = []
    handle = _record_forwards(module.model, seen)
    try:
        L.Trainer(precision="bf16-mixed", accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False).validate(module, TaskDataModule(task="stereoset", **LIMITS))
    finally:
        handle.remove()
    _assert_full_inside(seen)
    assert _settings() == reduced_precision
    fp32 = evaluate(tiny_module("tiny-gpt2"), TaskDataModule(task="stereoset", **LIMITS))
    assert [p["score"] for p in module.last_evaluation["per_example"]] == pytest.approx(
        [p["score"] for p in fp32["per_example"]], abs=1e-6)


def test_ensemble_general_nll_pass_runs_in_full_precision(reduced_precision, tiny_module, data_root) -> None:
    from editing.protocol.ensemble_search import ensemble_module, general_nll_by_beta

    large = tiny_module("tiny-gpt2")
    backpack = tiny_module("tiny-backpack")
    _, ensemble = ensemble_module(large.loaded, backpack, 50257)
    dm = TaskDataModule(task="stereoset", **LIMITS)
    dm.attach(large.tokenizer, large.max_length)
    seen: list[dict] = []
    handles = [_record_forwards(large.model, seen), _record_forwards(backpack.model, seen)]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            general_nll_by_beta(ensemble, dm, betas=(1.0, 0.0))
    finally:
        for handle in handles:
            handle.remove()
    _assert_full_inside(seen)
    assert _settings() == reduced_precision


def test_training_keeps_bf16_autocast_while_evaluation_is_fp32(tmp_path, data_root) -> None:
    """Under bf16-mixed on CPU the training step runs in autocast; the budget callback's evaluations do not."""
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2),
                        regularization=RegularizationConfig(kind="none"))
    seen: list[dict] = []
    handle = _record_forwards(module.model, seen)
    try:
        L.Trainer(precision="bf16-mixed", accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2,
                  logger=False, enable_progress_bar=False, enable_checkpointing=False, num_sanity_val_steps=0,
                  use_distributed_sampler=False, callbacks=[DegradationBudget(output_dir=str(tmp_path / "run"))],
                  ).fit(module, TaskDataModule(task="country_capital", **LIMITS))
    finally:
        handle.remove()
    training = [s for s in seen if s["grad"]]
    evaluating = [s for s in seen if not s["grad"]]
    assert len(training) == 2 and all(s["autocast"] for s in training)
    _assert_full_inside(evaluating)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]


def _validate(tmp_path: Path, name: str, data_root: Path, precision: str) -> list[float]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "editing.cli", "validate", "--model.base.name", "tiny-gpt2",
           "--model.base.precision", "fp32", "--data.task", "stereoset", "--data.eval_limit", "8",
           "--data.general_limit", "6", "--data.data_root", str(data_root), "--trainer.accelerator", "cpu",
           "--trainer.devices", "1", "--trainer.enable_progress_bar", "false", "--trainer.precision", precision,
           "--report.output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
    record = json.loads((out / "evaluation.json").read_text())
    scores = [json.loads(line)["score"] for line in (out / "evaluation_scores.jsonl").read_text().splitlines()]
    return scores + [record["metrics"][k] for k in ("general_nll", "targeted_nll", "hard_negative_nll")]


def test_cli_validate_under_bf16_mixed_equals_fp32(tmp_path, data_root) -> None:
    fp32 = _validate(tmp_path, "fp32", data_root, "32-true")
    mixed = _validate(tmp_path, "bf16", data_root, "bf16-mixed")
    assert len(fp32) == 8 + 3
    assert mixed == pytest.approx(fp32, abs=1e-6, rel=0)

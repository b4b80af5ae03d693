"""On a CUDA GPU: the ensemble's beta search, the MEMIT statistics and the evaluation's
precision, each run on the GPU and compared with the same computation on the CPU.

Marked ``gpu``: skipped without CUDA. ``scripts/gpu_check.sh`` runs them; ``GPU_CHECK_DEVICE=cpu`` runs them on the
CPU instead (its dry mode), which checks the tests themselves but not the GPU. The tiny fit of each registered
method on the GPU is the method contract's (``tests/methods/test_contract.py::test_the_tiny_fit_runs_on_the_gpu``).
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from fakes import _backpack_edit

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
from editing.evaluation import evaluate
from editing.methods import (
    EditingModule,
    LoRAConfig,
    LoRAEditor,
    MEMITConfig,
    MEMITEditor,
)
from editing.methods.base import OptimizerConfig
from editing.methods.memit.compute import layer_update
from editing.models.loading import ModelConfig, load_model
from editing.protocol.ensemble_search import search
from editing.rules.budget import ball_key

pytestmark = pytest.mark.gpu

LIMITS = {"eval_limit": 6, "general_limit": 8}
MEMIT_FAST = {"layers": [1, 2], "covariance_samples": 1500, "context_templates": 1, "context_template_length": 4,
              "steps": 5}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def _accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"


def _short_trainer(device: torch.device, tmp_path, *callbacks: L.Callback) -> L.Trainer:
    """One epoch of 3 batches on ``device``, with the budget callback writing to ``tmp_path / "run"``."""
    return L.Trainer(accelerator=_accelerator(device), devices=1, max_epochs=1, limit_train_batches=3, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                     callbacks=[DegradationBudget(output_dir=str(tmp_path / "run"), p0_cache=False), *callbacks])

def test_ensemble_beta_search_on_the_gpu(tmp_path, data_root, gpu_device) -> None:
    _backpack_edit("senses", tmp_path / "edit", data_root)
    balls = (0.5, 1e-3)
    found = {}
    for device in (torch.device("cpu"), gpu_device):
        large = load_model(ModelConfig(name="tiny-gpt2", precision="fp32"))
        large.model.to(device)
        backpacks = {ball_key(eps): load_edited(tmp_path / "edit") for eps in balls}
        found[device.type] = search(large, backpacks, TaskDataModule(task="country_capital", **LIMITS), balls,
                                    progress=False)
        assert {p.device.type for b in backpacks.values() for p in b.model.parameters()} == {device.type}
    cpu, gpu = found["cpu"], found[gpu_device.type]
    for key in cpu["balls"]:
        assert gpu["balls"][key]["beta"] == cpu["balls"][key]["beta"]
        for beta, nll in cpu["balls"][key]["general_nll_by_beta"].items():
            assert gpu["balls"][key]["general_nll_by_beta"][beta] == pytest.approx(nll, rel=1e-5)


def test_eight_bit_adam_fits_lora_on_the_gpu(tmp_path, data_root, gpu_device) -> None:
    if gpu_device.type != "cuda":
        pytest.skip("8-bit Adam is CUDA only (the CPU refusal: tests/methods/test_training.py)")
    bnb = pytest.importorskip("bitsandbytes", reason="optimizer.eight_bit needs bitsandbytes")
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4),
                        optimizer=OptimizerConfig(lr=1e-3, eight_bit=True))
    before = {k: v.detach().clone() for k, v in module.trainable_parameters().items()}
    trainer = _short_trainer(gpu_device, tmp_path)
    trainer.fit(module, TaskDataModule(task="country_capital", **LIMITS))
    assert isinstance(trainer.optimizers[0], bnb.optim.Adam8bit)
    after = module.trainable_parameters()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k].detach().cpu().to(before[k].device)) for k in before)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "finished"


def test_memit_statistics_and_solve_on_the_gpu(tmp_path, data_root, monkeypatch, gpu_device) -> None:
    modules = {}
    for device in (torch.device("cpu"), gpu_device):
        monkeypatch.setenv("EDITING_CACHE", str(tmp_path / f"cache-{device.type}"))
        module = MEMITEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), MEMITConfig(**MEMIT_FAST)).to(device)
        dm = TaskDataModule(task="country_capital", **LIMITS)
        module.compute_edit(dm, progress=False)
        assert {m.device.type for m in module.covariance_stats.moments.values()} == {device.type}
        assert {p.device.type for p in module.trainable_parameters().values()} == {device.type}
        modules[device.type] = module
    cpu, gpu = modules["cpu"], modules[gpu_device.type]
    for layer in (1, 2):
        torch.testing.assert_close(gpu.covariance_stats.moments[layer].cpu(), cpu.covariance_stats.moments[layer],
                                   rtol=1e-5, atol=1e-8)
    assert all(torch.isfinite(t).all() for t in gpu.delta_state().values())
    # the closed-form solve itself (float64) on the same keys, residuals and moment: the targets before it come from
    # Adam steps, whose first moves on near-zero gradients differ between devices, and the two devices' moments
    # (equal to 1e-5 above) give updates 5% apart through the ill-conditioned system (seen on an H200)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 256, generator=generator, dtype=torch.float64)
    residual = torch.randn(6, 64, generator=generator, dtype=torch.float64)
    moment = cpu.covariance_stats.moments[1]
    expected = layer_update(keys, residual, moment, 15000.0)
    got = layer_update(keys.to(gpu_device), residual.to(gpu_device), moment.to(gpu_device), 15000.0)
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == gpu_device.type
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-10)


def test_evaluation_precision_on_the_gpu(data_root, gpu_device) -> None:
    # fp32 weights: the evaluation scores in full fp32 on the GPU whatever the process set (TF32, bf16 autocast);
    # bf16 weights: within the precision bound docs/results.md measures (2.8e-3 relative on SmolLM2)
    name = "smollm2-135m" if gpu_device.type == "cuda" else "tiny-llama"  # no SmolLM2 evaluation on the CPU
    dm = TaskDataModule(task="country_capital", eval_limit=6, general_limit=10)
    fp32 = EditingModule(ModelConfig(name=name, precision="fp32")).to(gpu_device)
    exact = evaluate(fp32, dm)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(gpu_device.type, dtype=torch.bfloat16):
            under_autocast = evaluate(fp32, dm)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert under_autocast["general_nll"] == pytest.approx(exact["general_nll"], rel=1e-6)
    assert [p["score"] for p in under_autocast["per_example"]] == pytest.approx(
        [p["score"] for p in exact["per_example"]], rel=1e-5, abs=1e-5)
    bf16 = EditingModule(ModelConfig(name=name, precision="bf16")).to(gpu_device)
    rough = evaluate(bf16, dm)
    relative = abs(rough["general_nll"] - exact["general_nll"]) / exact["general_nll"]
    print(f"{name} on {gpu_device}: general NLL fp32 {exact['general_nll']:.7f}, bf16 {rough['general_nll']:.7f} "
          f"({relative:.2e} relative)")
    assert relative < 1e-2

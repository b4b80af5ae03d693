"""Editing methods on tiny models: fit/test per task x method, KL at step 0, divergence, resume, LoRA edits as peft
adapters, DDP (what every method must do is the method contract's, tests/methods/test_contract.py)."""

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
from editing.methods import FullEditor, LoRAConfig, LoRAEditor, OptimizerConfig, RegularizationConfig
from editing.methods.regularizers import kl_to_reference
from editing.models.loading import ModelConfig
from editing.rules.tasks import BUILTIN_TASKS
from editing.runs.checkpoints import load_checkpoint_file

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"eval_limit": 6, "general_limit": 8}


def make(method: str, model: str = "tiny-gpt2", lr: float = 1e-3, **kw):
    base = ModelConfig(name=model, precision="fp32")
    optimizer = OptimizerConfig(lr=lr)
    if method == "lora":
        return LoRAEditor(base, lora=LoRAConfig(rank=4, layer_fraction=0.5), optimizer=optimizer, **kw)
    return FullEditor(base, optimizer=optimizer, **kw)


def trainer(tmp_path: Path, epochs: int = 2, batches: int = 4, callbacks=(), **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, limit_train_batches=batches, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks), enable_checkpointing=False, **kw)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("task", list(BUILTIN_TASKS))
def test_fit_then_test_every_task_and_method(tmp_path, data_root, task: str, method: str) -> None:
    L.seed_everything(0)
    module = make(method)
    dm = TaskDataModule(task=task, **LIMITS)
    budget = DegradationBudget(output_dir=str(tmp_path / "run"))
    trainer(tmp_path, epochs=1, batches=3, callbacks=[budget]).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == method
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]
    assert set(results["balls"]) == {"1e-03", "1e-04", "1e-05"}
    # the edit changed the model: general NLL after the epoch differs from p0's
    assert results["epochs"][1]["general_nll"] != results["epochs"][0]["general_nll"]
    tested = L.Trainer(logger=False, enable_progress_bar=False, use_distributed_sampler=False)
    tested.test(module, TaskDataModule(task=task, split="test", **LIMITS))
    assert module.last_evaluation["counts"]["evaluation"] == LIMITS["eval_limit"]


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_kl_is_zero_before_the_first_step(data_root, method: str, model: str) -> None:
    module = make(method, model=model)
    dm = TaskDataModule(task="country_capital", regularization_batch_size=3)
    dm.attach(module.tokenizer, module.max_length)
    module.model.eval()
    kl = kl_to_reference(module.model, module.reference, dm.regularization_batch(0))
    assert kl.item() == 0.0
    # and it is a real KL: perturbing a trainable delta makes it positive
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    assert kl_to_reference(module.model, module.reference, dm.regularization_batch(0)).item() > 1e-6


def test_kl_masks_padding(data_root) -> None:
    module = make("lora")
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    dm = TaskDataModule(task="country_capital", regularization_batch_size=1)
    dm.attach(module.tokenizer, module.max_length)
    single = dm.regularization_batch(0)
    from editing.data.batching import collate

    data = dm.load("regularization").examples
    short = min(data, key=lambda e: e.length)
    padded = collate([data[int(single["example_index"][0])], short], role="r", pad_id=dm.pad_id)
    alone = collate([short], role="r", pad_id=dm.pad_id)
    both = kl_to_reference(module.model, module.reference, padded).item() * 2
    parts = (kl_to_reference(module.model, module.reference, single).item()
             + kl_to_reference(module.model, module.reference, alone).item())
    assert both == pytest.approx(parts, rel=1e-4)


def test_lora_reference_is_the_adapter_switched_off_not_a_copy() -> None:
    module = make("lora")
    with module.reference() as p0:
        assert p0 is module.model
    n_base = sum(p.numel() for n, p in module.named_parameters() if "lora_" not in n)
    assert n_base == module.identity["num_parameters"]


def test_diverged_run_keeps_earlier_valid_epochs(tmp_path, data_root) -> None:
    L.seed_everything(0)
    module = make("full", lr=1e-4)
    dm = TaskDataModule(task="country_capital", **LIMITS)
    budget = DegradationBudget(output_dir=str(tmp_path / "run"), patience=10)

    class Explode(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.optim_config.lr = 1e30
                for group in trainer.optimizers[0].param_groups:
                    group["lr"] = 1e30
                    group["initial_lr"] = 1e30
                trainer.lr_scheduler_configs[0].scheduler.base_lrs = [1e30]

    trainer(tmp_path, epochs=4, batches=6, callbacks=[budget, Explode()]).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "diverged"
    assert results["diverged_at_epoch"] == 2
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]
    for info in results["balls"].values():
        assert info["epoch"] in (0, 1)


def test_results_are_never_overwritten_silently(tmp_path, data_root) -> None:
    from editing.core.files import ResultsExistError

    module = make("lora")
    run = tmp_path / "run"
    trainer(tmp_path, epochs=1, batches=2, callbacks=[DegradationBudget(output_dir=str(run))]).fit(
        module, TaskDataModule(task="stereoset", **LIMITS))
    first = (run / "results.json").read_text()
    with pytest.raises(ResultsExistError):
        trainer(tmp_path, epochs=1, batches=2, callbacks=[DegradationBudget(output_dir=str(run))]).fit(
            make("lora"), TaskDataModule(task="stereoset", **LIMITS))
    assert (run / "results.json").read_text() == first


def _fit_with_checkpoints(tmp_path: Path, run: str, epochs: int, stop_after: int | None = None,
                          ckpt_path: str | None = None) -> dict:
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = make("lora", regularization=RegularizationConfig(kind="kl", weight=0.5))
    dm = TaskDataModule(task="country_capital", **LIMITS)
    budget = DegradationBudget(output_dir=str(tmp_path / run))
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / run / "checkpoints"), save_last=True, save_top_k=1)
    callbacks = [budget, ckpt]
    if stop_after is not None:
        class Interrupt(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == stop_after:
                    raise RuntimeError("simulated crash mid-run")

        callbacks.append(Interrupt())
    tr = L.Trainer(max_epochs=epochs, limit_train_batches=6, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                   default_root_dir=str(tmp_path), callbacks=callbacks, accumulate_grad_batches=2)
    if stop_after is not None:
        with pytest.raises(RuntimeError, match="simulated crash"):
            tr.fit(module, dm, ckpt_path=ckpt_path)
    else:
        tr.fit(module, dm, ckpt_path=ckpt_path)
    path = tmp_path / run / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_resume_after_interruption_gives_identical_results(tmp_path, data_root) -> None:
    straight = _fit_with_checkpoints(tmp_path, "straight", epochs=3)
    partial = _fit_with_checkpoints(tmp_path, "resumed", epochs=3, stop_after=2)
    assert partial == {}  # interrupted: no results yet
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(last)
    assert all("lora_" in k for k in checkpoint["state_dict"])  # only the deltas
    assert checkpoint["base_identity"]["name"] == "tiny-gpt2"
    resumed = _fit_with_checkpoints(tmp_path, "resumed", epochs=3, ckpt_path=str(last))
    assert [e["general_nll"] for e in resumed["epochs"]] == [e["general_nll"] for e in straight["epochs"]]
    assert [e["success_rate"] for e in resumed["epochs"]] == [e["success_rate"] for e in straight["epochs"]]
    assert resumed["balls"] == straight["balls"]


def test_resume_onto_another_base_model_fails(tmp_path, data_root) -> None:
    from editing.core.errors import ConfigError

    _fit_with_checkpoints(tmp_path, "a", epochs=1)
    other = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32", seed=1), lora=LoRAConfig(rank=4))
    tr = trainer(tmp_path, epochs=2, batches=2)
    with pytest.raises(ConfigError, match="fingerprint"):
        tr.fit(other, TaskDataModule(task="country_capital", **LIMITS),
               ckpt_path=str(tmp_path / "a" / "checkpoints" / "last.ckpt"))


def test_a_lora_edit_is_a_plain_peft_adapter(tmp_path) -> None:
    # what every method's saved edit must do (load_edited, editing apply) is the method contract's
    # (tests/methods/test_contract.py); LoRA's own promise is that peft alone loads its edit
    from peft import PeftModel

    from editing.edits.load import load_edited
    from editing.models.loading import load_model

    module = make("lora")
    with torch.no_grad():
        for p in module.trainable_parameters().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    edit = module.export_edit(tmp_path / "edit")
    peft_model = PeftModel.from_pretrained(load_model(name="tiny-gpt2", precision="fp32").model, str(edit))
    peft_model.eval()
    module.model.eval()
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    with torch.no_grad():
        want = module.model(input_ids=ids).logits
        assert torch.equal(peft_model(input_ids=ids).logits, want)
        assert torch.equal(load_edited(edit).model(input_ids=ids).logits, want)


def _cli_fit(tmp_path: Path, name: str, extra: list[str]) -> dict:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "editing.cli", "fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2",
           "--model.lora.rank", "4", "--model.optimizer.lr", "1e-3", "--data.task", "pronoun_gender_bias",
           "--data.eval_limit", "8", "--data.general_limit", "8", "--trainer.max_epochs", "2",
           "--trainer.limit_train_batches", "8", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar",
           "false", "--trainer.logger.init_args.save_dir", str(out), "--budget.output_dir", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def test_ddp_two_processes_match_one(tmp_path, data_root) -> None:
    one = _cli_fit(tmp_path, "one", ["--trainer.devices", "1", "--trainer.accumulate_grad_batches", "2"])
    two = _cli_fit(tmp_path, "two", ["--trainer.strategy", "ddp", "--trainer.devices", "2",
                                     "--trainer.limit_train_batches", "4"])
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert b["general_nll"] == pytest.approx(a["general_nll"], rel=1e-6)
        assert b["success_rate"] == a["success_rate"]
        assert b["counts"] == a["counts"]


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_full_finetuning_with_gradient_checkpointing(tmp_path, data_root, model: str) -> None:
    L.seed_everything(0)
    module = FullEditor(ModelConfig(name=model, precision="fp32"), gradient_checkpointing=True,
                          optimizer=OptimizerConfig(lr=1e-3))
    assert module.model.is_gradient_checkpointing
    dm = TaskDataModule(task="country_capital", regularization_batch_size=2, **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    module.on_train_batch_start({}, 0)  # the training mode the module runs its steps in
    assert module.model.training
    assert kl_to_reference(module.model, module.reference, dm.regularization_batch(0)).item() == 0.0
    budget = DegradationBudget(output_dir=str(tmp_path / "run"))
    trainer(tmp_path, epochs=1, batches=3, callbacks=[budget]).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["epochs"][1]["general_nll"] != results["epochs"][0]["general_nll"]


def test_cli_resumes_in_its_own_run_folder(tmp_path, data_root) -> None:
    args = [sys.executable, "-m", "editing.cli", "fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2",
            "--data.task", "stereoset", "--data.eval_limit", "5", "--data.general_limit", "5",
            "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false"]
    first = subprocess.run([*args, "--trainer.max_epochs", "1"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([*args, "--trainer.max_epochs", "2", "--trainer.logger.init_args.version", "0",
                            "--ckpt_path", "last"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    results = json.loads((tmp_path / "runs" / "fit" / "version_0" / "results.json").read_text())
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    assert not (tmp_path / "runs" / "fit" / "version_1").exists()


@pytest.mark.parametrize("kind", ["l2", "ewc", "none"])
def test_other_regularizers(tmp_path, data_root, kind: str) -> None:
    L.seed_everything(0)
    module = make("lora", regularization=RegularizationConfig(kind=kind, weight=1.0, fisher_batches=2))
    dm = TaskDataModule(task="country_capital", **LIMITS)
    trainer(tmp_path, epochs=1, batches=3, callbacks=[DegradationBudget(output_dir=str(tmp_path / "run"))]).fit(
        module, dm)
    if kind == "none":
        assert module.regularization_loss().item() == 0.0
        return
    assert set(module._initial) == set(module.trainable_parameters())
    # the deltas moved away from p0, so the pull toward p0 is positive
    assert module.regularization_loss().item() > 0
    if kind == "ewc":
        assert all(f.shape == module._initial[n].shape for n, f in module._fisher.items())
        assert any(f.abs().sum() > 0 for f in module._fisher.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_eight_bit_adam_without_cuda_is_refused_with_the_fix() -> None:
    from editing.core.errors import ConfigError

    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2),
                        optimizer=OptimizerConfig(lr=1e-3, eight_bit=True))
    with pytest.raises(ConfigError, match="optimizer.eight_bit=true needs a CUDA device.*set it to false"):
        module.configure_optimizers()

"""Every computation runs on the trainer's (module's) device: the sense selection, the ensemble and its beta search,
the MEMIT statistics and solve, and L2/EWC state restored from a checkpoint.

Without CUDA, the device is the fake accelerator of ``tests/fake_device.py``: tensors that report the ``meta``
device but carry real values, under CUDA's rules (a CPU tensor beside a device tensor raises). Each test also asserts
that no floating-point operation ran on the CPU (``FakeDevice.cpu_ops``), and that the numbers equal those of the
same computation on the CPU.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from fake_device import FAKE, FakeDevice, on_fake_device, to_fake_device
from fakes import _backpack_edit

from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
from editing.methods import LoRAConfig, LoRAEditor, MEMITConfig, MEMITEditor, SensesConfig, SensesEditor
from editing.methods.base import RegularizationConfig
from editing.methods.memit import covariance
from editing.models.loading import ModelConfig, load_model
from editing.protocol.ensemble_search import search
from editing.rules.budget import ball_key

LIMITS = {"eval_limit": 4, "general_limit": 5}
MEMIT_FAST = {"covariance_samples": 1500, "covariance_batch_size": 2, "context_templates": 1,
              "context_template_length": 4, "steps": 4}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own statistics caches (a cached background or covariance would skip the computation)."""
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def _dm(module, task: str = "country_capital") -> TaskDataModule:
    dm = TaskDataModule(task=task, **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def _trainer_on_fake_device(datamodule) -> SimpleNamespace:
    """What ``setup`` reads of a Trainer whose strategy will run the module on the fake device."""
    return SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(root_device=FAKE))


def _unwrapped(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu() if on_fake_device(tensor) else tensor


# ---- sense selection ---------------------------------------------------------------------------------------------
def test_sense_selection_runs_on_the_trainers_device(data_root, tmp_path, monkeypatch) -> None:
    # Lightning calls setup() before its strategy moves the module to the device: the selection (R's background and
    # each example's importance) must still run there
    config = SensesConfig(senses_per_example=3, background_limit=6)
    module = SensesEditor(ModelConfig(name="tiny-backpack", precision="fp32"), senses=config)
    dm = _dm(module)
    module.trainer = _trainer_on_fake_device(dm)
    with FakeDevice() as device:
        module.setup("fit")
    assert device.cpu_ops == []
    assert on_fake_device(module.sense_deltas.vectors) and on_fake_device(module.sense_deltas.slot)
    assert on_fake_device(next(module.model.parameters()))

    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cpu-cache"))  # the CPU run computes its own background
    reference = SensesEditor(ModelConfig(name="tiny-backpack", precision="fp32"), senses=config).select(_dm(module))
    assert torch.equal(module.selection.vocab_ids, reference.vocab_ids)
    assert torch.equal(module.selection.sense_ids, reference.sense_ids)
    torch.testing.assert_close(module.selection.importance, reference.importance, rtol=1e-5, atol=1e-6)


# ---- the ensemble ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["senses", "lora", "full"])
def test_ensemble_search_runs_on_the_large_models_device(kind, data_root, tmp_path) -> None:
    # the large model on the device, the Backpack edit loaded from its files (on the CPU): the search puts both on
    # the large model's device, an installed sense edit included
    _backpack_edit(kind, tmp_path / "edit", data_root)
    balls = (0.5, 1e-3)
    found = {}
    for where in ("cpu", "device"):
        large = load_model(ModelConfig(name="tiny-gpt2", precision="fp32"))
        backpacks = {ball_key(eps): load_edited(tmp_path / "edit") for eps in balls}
        dm = TaskDataModule(task="country_capital", **LIMITS)
        if where == "cpu":
            found[where] = search(large, backpacks, dm, balls, progress=False)
            continue
        to_fake_device(large.model)
        with FakeDevice() as device:
            found[where] = search(large, backpacks, dm, balls, progress=False)
        assert device.cpu_ops == []
        for module in backpacks.values():
            assert all(on_fake_device(p) for p in module.model.parameters())
    cpu, dev = found["cpu"], found["device"]
    for key in cpu["balls"]:
        assert dev["balls"][key]["beta"] == cpu["balls"][key]["beta"]
        for beta, nll in cpu["balls"][key]["general_nll_by_beta"].items():
            assert dev["balls"][key]["general_nll_by_beta"][beta] == pytest.approx(nll, rel=1e-6)
        assert dev["balls"][key]["metrics"]["general_nll"] == pytest.approx(cpu["balls"][key]["metrics"]["general_nll"],
                                                                            rel=1e-6)
    assert dev["initial"]["general_nll"] == pytest.approx(cpu["initial"]["general_nll"], rel=1e-6)


# ---- MEMIT -------------------------------------------------------------------------------------------------------
def _memit(**kw) -> MEMITEditor:
    return MEMITEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), MEMITConfig(**{**MEMIT_FAST, **kw}))


def test_memit_statistics_and_solve_run_on_the_modules_device(data_root, tmp_path, monkeypatch) -> None:
    module = to_fake_device(_memit(layers=[1, 2]))
    dm = _dm(module)
    with FakeDevice() as device:
        module.compute_edit(dm, progress=False)
        stats = module.covariance_stats
        assert stats.computed_layers == [1, 2]
    second = to_fake_device(_memit(layers=[1, 2]))
    with FakeDevice() as cached:
        # a second module finds the statistics cached on disk: they come back on its device too
        again = second.statistics(dm, progress=False)
    assert again.computed_layers == []
    assert device.cpu_ops == [] and cached.cpu_ops == []
    for layer in (1, 2):
        assert on_fake_device(stats.moments[layer]) and on_fake_device(again.moments[layer])
        assert on_fake_device(module.memit_u[str(layer)]) and on_fake_device(module.memit_v[str(layer)])

    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cpu-cache"))
    reference = _memit(layers=[1, 2])
    reference.compute_edit(_dm(reference), progress=False)
    for layer in (1, 2):
        # fp32 forward passes: transformers may pick another (equivalent) attention path for another device type
        torch.testing.assert_close(_unwrapped(stats.moments[layer]), reference.covariance_stats.moments[layer],
                                   rtol=1e-5, atol=1e-8)
        for name in ("memit_u", "memit_v"):
            torch.testing.assert_close(_unwrapped(getattr(module, name)[str(layer)].data),
                                       getattr(reference, name)[str(layer)].data, rtol=1e-4, atol=1e-6)


def test_interrupted_memit_statistics_resume_on_the_device(data_root, monkeypatch) -> None:
    # the partial sums saved by an interrupted run on the device are read back from disk (on the CPU): resuming
    # there must add the device's batch sums to them there. (Partial sums of another device are another
    # computation's, a cache miss: the device type is part of their key.)
    module = _memit(layers=[1], covariance_samples=3000)
    dm = _dm(module)
    reference = module.statistics(dm, progress=False).moments[1]
    for f in (covariance.cache_dir() / "memit_stats").rglob("*.safetensors"):
        f.unlink()
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] > covariance.SAVE_EVERY + 1:
            raise KeyboardInterrupt

    # a hook on the model, not a patch of covariance's code (patched code would key the partial sums apart)
    to_fake_device(module)
    handle = module.model.register_forward_pre_hook(interrupted)
    with FakeDevice(), pytest.raises(KeyboardInterrupt):
        module.statistics(dm, progress=False)
    handle.remove()
    assert list((covariance.cache_dir() / "memit_stats").rglob("*.partial.safetensors"))
    resumed_from = {"n": 0}
    module.model.register_forward_pre_hook(lambda *a: resumed_from.__setitem__("n", resumed_from["n"] + 1))
    with FakeDevice() as device:
        resumed = module.statistics(dm, progress=False)
    assert device.cpu_ops == []
    assert resumed.computed_layers == [1] and on_fake_device(resumed.moments[1])
    assert resumed_from["n"] < calls["n"] + 20  # it resumed, it did not start over
    torch.testing.assert_close(resumed.moments[1].cpu(), reference, rtol=1e-5, atol=1e-8)


# ---- L2 / EWC state from a checkpoint ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l2", "ewc"])
def test_regularization_state_from_a_checkpoint_follows_the_module(kind, data_root) -> None:
    # Lightning restores a checkpoint before its strategy moves the module to the device; p0's values (and the
    # Fisher weights) read from the checkpoint are CPU tensors
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2),
                        regularization=RegularizationConfig(kind=kind, weight=1.0))
    params = module.trainable_parameters()
    initial = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in params.items()}
    checkpoint = {"state_dict": {n: p.detach().clone() for n, p in params.items()},
                  "base_identity": dict(module.identity),
                  "editing_state": {"diverged": False, "initial": initial, "fisher": fisher}}
    module.on_load_checkpoint(checkpoint)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    expected = sum(((fisher[n] if kind == "ewc" else 1.0) * (p.detach() - initial[n]).pow(2)).sum()
                   for n, p in params.items())
    to_fake_device(module)  # the strategy moves the module
    with FakeDevice() as device:
        module.on_fit_start()
        value = module.regularization_loss()
    assert device.cpu_ops == []
    assert on_fake_device(value)
    assert float(value) == pytest.approx(float(expected), rel=1e-6)


# ---- the --device setting of commands outside a Trainer -------------------------------------------------------------
def test_device_setting_names_the_device_or_says_what_is_wrong() -> None:
    from editing.commands.devices import resolve_device
    from editing.core.errors import ConfigError

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad, says in (("gpu", "is not a device"), ("meta", "only cpu and cuda"), ("cuda:99", "CUDA device(s)")):
        with pytest.raises(ConfigError, match=re.escape(f"--device={bad!r}") + ".*" + re.escape(says)):
            resolve_device(bad)

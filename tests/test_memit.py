"""MEMIT on tiny models: keys map to their targets, targets become likelier, removal is exact, statistics are cached
(and resumed), and a fit with the DegradationBudget callback writes results and loadable edits."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.edits import load_edited
from editing.errors import ConfigError, DataFormatError
from editing.evaluation.scorer import example_nll
from editing.methods import MEMITConfig, MEMITEditor
from editing.methods.memit import covariance
from editing.methods.memit.compute import subject_activations
from editing.methods.memit.requests import RowBuilder
from editing.models.loading import ModelConfig

FAMILIES = ("tiny-gpt2", "tiny-llama", "tiny-neox")
LIMITS = {"eval_limit": 6, "general_limit": 8}
FAST = {"covariance_samples": 1500, "context_templates": 1, "context_template_length": 4, "steps": 10}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own statistics cache."""
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))


def make(model: str = "tiny-gpt2", **kw) -> MEMITEditor:
    return MEMITEditor(ModelConfig(name=model, precision="fp32"), MEMITConfig(**{**FAST, **kw}))


def datamodule(module: MEMITEditor, task: str = "country_capital") -> TaskDataModule:
    dm = TaskDataModule(task=task, **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def canonical_nll(module: MEMITEditor, dm: TaskDataModule, count: int) -> torch.Tensor:
    from editing.data.batching import collate

    examples = dm.load("canonical").examples[:count]
    batch = collate(examples, role="canonical", pad_id=dm.pad_id)
    with torch.no_grad():
        sums, _ = example_nll(module.model, batch)
    return sums[:, 0]


@pytest.mark.parametrize("model", FAMILIES)
def test_edited_layer_maps_keys_to_targets(data_root, model: str) -> None:
    # One layer, the bare prompt only and a tiny lambda: the closed form must then hit every target exactly.
    module = make(model, layers=[2], context_templates=0, covariance_weight=1e-6)
    dm = datamodule(module)
    requests = module.canonical_requests(dm)[:6]
    captured = {}
    import editing.methods.memit.module as memit_module

    original = memit_module.optimize_targets

    def spy(*args, **kwargs):
        captured["z"] = original(*args, **kwargs)
        return captured["z"]

    memit_module.optimize_targets = spy
    try:
        module.compute_edit(dm, requests, progress=False)
    finally:
        memit_module.optimize_targets = original
    rows = RowBuilder(module.tokenizer, module.max_length).rows(requests, [""], with_suffixes=False)
    after = subject_activations(module.model, rows, 2, "output", dm.pad_id)
    z = captured["z"]
    with module.deltas_off():
        before = subject_activations(module.model, rows, 2, "output", dm.pad_id)
    assert (z - before).norm(dim=1).min() > 1e-3  # the targets really moved
    torch.testing.assert_close(after, z, atol=1e-3 * z.norm(dim=1).max().item(), rtol=0)


@pytest.mark.parametrize("model", FAMILIES)
def test_targets_become_likelier_and_removal_is_exact(data_root, model: str) -> None:
    # Random tiny models have near-uniform heads behind a final layer norm: no hidden change moves their NLL by more
    # than about half a nat, so the test asks for a clear but small gain on every prompt.
    module = make(model, layers=[1, 2], covariance_weight=10.0, clamp_norm_factor=4.0, steps=20)
    dm = datamodule(module)
    weights = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    requests = module.canonical_requests(dm)[:6]
    before = canonical_nll(module, dm, 6)
    module.compute_edit(dm, requests, progress=False)
    after = canonical_nll(module, dm, 6)
    assert after.mean() < before.mean() - 0.1, (before, after)
    assert (after < before).all()
    with module.reference():  # p0 is the same model with the deltas off
        torch.testing.assert_close(canonical_nll(module, dm, 6), before, atol=0, rtol=0)
    module.clear_edit()  # removing the deltas restores the original model bit for bit
    assert torch.equal(canonical_nll(module, dm, 6), before)
    for name, p in module.model.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_second_run_reuses_cached_statistics(data_root, monkeypatch) -> None:
    module = make(layers=[1, 2])
    dm = datamodule(module)
    first = module.statistics(dm, progress=False)
    assert first.computed_layers == [1, 2] and first.seconds > 0
    files = sorted((Path(covariance.cache_dir()) / "memit_stats").rglob("*.safetensors"))
    assert len(files) == 2 and not any("partial" in f.name for f in files)

    def no_forward(*args, **kwargs):
        raise AssertionError("statistics were recomputed")

    # a hook on the model, not a patch of the code: patched code is other code, whose statistics are another entry
    second_module = make(layers=[1, 2])  # a new module: only the disk cache can help
    handle = second_module.model.register_forward_pre_hook(no_forward)
    second = second_module.statistics(dm, progress=False)
    handle.remove()
    assert second.computed_layers == []
    for layer in (1, 2):
        assert torch.equal(first.moments[layer], second.moments[layer])
    # a different sample count is a different statistic
    third = make(layers=[1, 2], covariance_samples=900).statistics(dm, progress=False)
    assert third.computed_layers == [1, 2]


def test_interrupted_statistics_resume(data_root, monkeypatch) -> None:
    module = make(layers=[1, 3], covariance_samples=3000, covariance_batch_size=2)
    dm = datamodule(module)
    reference = module.statistics(dm, progress=False).moments
    for f in (Path(covariance.cache_dir()) / "memit_stats").rglob("*.safetensors"):
        f.unlink()
    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] > covariance.SAVE_EVERY + 2:
            raise KeyboardInterrupt

    # hooks on the model (a patch of covariance's code would make the partial sums another computation's)
    handle = module.model.register_forward_pre_hook(interrupted)
    with pytest.raises(KeyboardInterrupt):
        module.statistics(dm, progress=False)
    handle.remove()
    partial = sorted((Path(covariance.cache_dir()) / "memit_stats").rglob("*.partial.safetensors"))
    assert len(partial) == 2
    counted = {"n": 0}

    def counting(*args):
        counted["n"] += 1

    module.model.register_forward_pre_hook(counting)
    resumed = module.statistics(dm, progress=False)
    assert resumed.computed_layers == [1, 3]
    assert counted["n"] < calls["n"] + 20  # it did not start over
    for layer in (1, 3):
        torch.testing.assert_close(resumed.moments[layer], reference[layer], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("task", ["stereoset", "pronoun_gender_bias", "verb_conjugation"])
def test_oracle_spans_and_task_losses(data_root, task: str) -> None:
    module = make(layers=[2], supervision="oracle", steps=3)
    dm = datamodule(module, task)
    requests = module.canonical_requests(dm)
    subject = {"stereoset": "Japanese", "pronoun_gender_bias": "janitor", "verb_conjugation": "officers"}[task]
    assert requests[0].subject == subject
    module.compute_edit(dm, requests[:4], progress=False)
    assert module.edited


def test_bad_settings_are_clear_errors(data_root) -> None:
    with pytest.raises(ConfigError, match="memit.layers"):
        make(layers=[1, 9])
    with pytest.raises(ConfigError, match="clamp_norm_factor"):
        MEMITConfig(clamp_norm_factor=0).validate()
    module = make(layers=[1], supervision="oracle")
    with pytest.raises(ConfigError, match="oracle_field"):
        module.canonical_requests(datamodule(module, "temporal"))
    module.memit_config.oracle_field = "capital"
    with pytest.raises(DataFormatError, match="occurs in no prefix"):
        module.canonical_requests(datamodule(module))
    module.memit_config.oracle_field = None
    module.memit_config.covariance_samples = 10**9
    with pytest.raises(ConfigError, match="covariance_samples"):
        module.statistics(datamodule(module), progress=False)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
def test_fit_with_budget_writes_results_and_loadable_edits(tmp_path, data_root, model: str) -> None:
    L.seed_everything(0)
    module = make(model, layers=[1, 2], covariance_weight=10.0)
    dm = TaskDataModule(task="country_capital", **LIMITS)
    budget = DegradationBudget(balls=[1e-3, 0.5], output_dir=str(tmp_path / "run"))
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                        callbacks=[budget], enable_checkpointing=False)
    trainer.fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["method"] == "memit" and results["status"] == "finished"
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]  # p0, then the one edit
    assert results["epochs"][1]["general_nll"] != results["epochs"][0]["general_nll"]
    assert results["hyperparameters"]["memit"]["layers"] == [1, 2]
    # the loose ball keeps the edit; its exported weights reproduce the hooked model
    assert results["balls"]["5e-01"]["epoch"] == 1
    edited = load_edited(results["edits"]["5e-01"])
    edited.model.eval()
    batch_nll = canonical_nll(edited, datamodule(module), 4)
    torch.testing.assert_close(batch_nll, canonical_nll(module, datamodule(module), 4), atol=1e-4, rtol=1e-4)


def test_checkpoint_round_trip_restores_the_edit(data_root) -> None:
    module = make(layers=[1, 2], steps=3)
    dm = datamodule(module)
    module.compute_edit(dm, module.canonical_requests(dm)[:4], progress=False)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(module.trainable_parameters())  # only the factors are saved
    fresh = make(layers=[1, 2], steps=3)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert fresh.edited
    assert torch.equal(canonical_nll(fresh, dm, 4), canonical_nll(module, dm, 4))


class InMemoryCanonical(TaskDataModule):
    """A DataModule serving canonical records of its own (here: three lines of the file, one subject changed)
    instead of parsing its task's canonical file."""

    def __init__(self, records, **kw) -> None:
        super().__init__(**kw)
        self.canonical = records

    def records(self, role: str, all_lines: bool = False):
        return self.canonical if role == "canonical" else super().records(role, all_lines)


def test_memit_takes_its_requests_from_the_datamodule(tmp_path, data_root) -> None:
    import dataclasses
    import shutil

    root = tmp_path / "data"
    for folder in ("country_capital", "general"):
        shutil.copytree(data_root / folder, root / folder)
    plain = TaskDataModule(task="country_capital", data_root=str(root), **LIMITS)
    records = plain.records("canonical")[:3]
    assert records[1].fields["country"] in records[1].prefix
    # the oracle subject comes from a record field: change it in memory, so a request built from the file differs
    fields = {**records[1].fields, "country": "capital"}
    records = [records[0], dataclasses.replace(records[1], fields=fields), records[2]]
    canonical = plain.path("canonical")
    canonical.write_text("not JSON\n")  # MEMIT must not read the task's canonical file itself
    L.seed_everything(0)
    module = make(layers=[1, 2], supervision="oracle", oracle_field="country")
    dm = InMemoryCanonical(records, task="country_capital", data_root=str(root), **LIMITS)
    budget = DegradationBudget(balls=[0.5], output_dir=str(tmp_path / "run"), save_edits=False)
    L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
              callbacks=[budget], enable_checkpointing=False).fit(module, dm)
    assert module.edited
    requests = module.canonical_requests(dm)
    assert [r.prefix for r in requests] == [r.prefix for r in records]
    # line 3 puts its country in the suffix ("The capital of" + " Algeria is Alger"): the whole prefix is its subject
    assert [r.subject for r in requests] == ["Afghanistan", "capital", "The capital of"]
    assert module.memit_u["1"].shape[1] == 3  # one key per request: rank 3

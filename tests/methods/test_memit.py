"""MEMIT on tiny models: keys map to their targets, targets become likelier, removal is exact, statistics are cached
(and resumed), and a fit with the DegradationBudget callback writes results and loadable edits."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.core.errors import ConfigError, DataFormatError
from editing.data.datamodule import TaskDataModule
from editing.edits.load import load_edited
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


# --- issue 34: MEMIT's memory with many requests (benchmarks/memit_memory.py) ------------------------------------
SYLLABLES = ("ka", "lo", "mi", "dra", "ven", "tor", "sel", "qua", "bri", "nox", "fen", "ash", "rim", "pel", "zu")


def invented_requests(n: int):
    """``n`` distinct "The capital of <invented country> is" requests (standard supervision: the whole prefix)."""
    import random

    from editing.methods.memit.requests import Request

    rng, names = random.Random(0), []
    while len(names) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
        if name not in names:
            names.append(name)
    prefixes = {name: f"The capital of {name} is" for name in names}
    return [Request(prefixes[name], (f" {name[::-1].capitalize()}",), (0, len(prefixes[name]))) for name in names]


def old_spread(module: MEMITEditor, requests, templates: list[str], z: torch.Tensor) -> tuple[dict, list[dict]]:
    """The spread as it was before issue 34, all requests at once: every key row's activations held together, then
    the realised change through the (n, n) product V K^T and the key geometry through the (n, n) Gram matrix."""
    from editing.methods.memit.compute import layer_update, mean_over_templates

    builder = RowBuilder(module.tokenizer, module.max_length)
    layers, pad = module.memit_layers, module._pad_id
    key_rows = builder.rows(requests, templates, with_suffixes=False)
    bare_rows = [r for r in key_rows if r.template == 0]
    factors, diagnostics = {}, []
    module.clear_edit()
    for i, layer in enumerate(layers):
        keys = mean_over_templates(subject_activations(module.model, key_rows, layer, "key", pad), key_rows,
                                   len(requests))
        current = subject_activations(module.model, bare_rows, layers[-1], "output", pad)
        residual = (z - current) / (len(layers) - i)
        moment = module.covariance_stats.moments[layer]
        u, v = layer_update(keys, residual, moment, module.memit_config.covariance_weight)
        realised = (v @ keys.T).T @ u.T
        whitened = torch.linalg.solve(moment.double(), keys.T).T
        gram = keys @ whitened.T
        norms = gram.diagonal().clamp(min=1e-30).sqrt()
        cosine = gram / (norms[:, None] * norms[None, :])
        n = len(keys)
        diagnostics.append({
            "layer": layer, "residual_norm": residual.norm(dim=1).mean().item(),
            "realised_fraction": ((realised * residual).sum(1) / residual.pow(2).sum(1).clamp(min=1e-30)).mean().item(),
            "key_mahalanobis": gram.diagonal().mean().item(),
            "key_cosine_c": ((cosine.sum() - cosine.diagonal().sum()) / (n * (n - 1))).item()})
        factors[f"memit_u.{layer}"], factors[f"memit_v.{layer}"] = u.float(), v.float()
        module.memit_u[str(layer)].data, module.memit_v[str(layer)].data = u.float(), v.float()
    module.clear_edit()
    return factors, diagnostics


def spread_setup(n: int, layers: tuple[int, ...] = (1, 2), **kw):
    module = make(layers=list(layers), covariance_weight=50.0, **kw)
    module.covariance_stats = module.statistics(datamodule(module), progress=False)
    requests = invented_requests(n)
    bare = RowBuilder(module.tokenizer, module.max_length).rows(requests, [""], with_suffixes=False)
    with torch.no_grad():  # targets near the current outputs, as the optimization leaves them
        current = subject_activations(module.model, bare, 2, "output", module._pad_id)
        noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        z = current + 0.3 * noise * current.norm(dim=1, keepdim=True) / current.shape[1] ** 0.5
    return module, requests, z


@pytest.mark.parametrize("chunk", [64, 1024])
def test_streamed_spread_equals_all_requests_at_once(data_root, chunk: int, capsys, monkeypatch) -> None:
    # 200 requests in chunks of 64 (four chunks, the last of 8) or in one chunk: the factors are the same bits as the
    # all-at-once computation, the diagnostics the same numbers up to float64 rounding (their sums run in another
    # order: no (n, n) matrix any more)
    module, requests, z = spread_setup(200)
    templates = ["", "The quick brown fox. ", "It was a dark night. "]
    expected, expected_diag = old_spread(module, requests, templates, z)
    module.key_chunk = chunk
    tokenized: list[int] = []  # requests per call that tokenizes key rows: the chunks
    original = RowBuilder.rows

    def counting(self, requests, templates, with_suffixes):
        tokenized.append(len(requests))
        return original(self, requests, templates, with_suffixes)

    monkeypatch.setattr(RowBuilder, "rows", counting)
    with torch.no_grad():
        module.spread_targets(requests, templates, z)
    monkeypatch.setattr(RowBuilder, "rows", original)
    assert max(tokenized) == min(chunk, 200) and sum(tokenized) == 200 * 2  # per chunk, for each of the 2 layers
    got = module.trainable_parameters()
    for name, tensor in expected.items():
        assert got[name].shape == (tensor.shape[0], 200) or got[name].shape == (200, tensor.shape[1])
        assert torch.equal(got[name], tensor), (name, (got[name] - tensor).abs().max().item())
    worst = {}
    for mine, theirs in zip(module.edit_diagnostics["layers"], expected_diag, strict=True):
        assert mine["layer"] == theirs["layer"]
        for key in ("residual_norm", "realised_fraction", "key_mahalanobis", "key_cosine_c"):
            worst[key] = max(worst.get(key, 0.0), abs(mine[key] - theirs[key]))
            assert mine[key] == pytest.approx(theirs[key], rel=1e-10, abs=1e-12), key
    with capsys.disabled():
        print(f"\nchunk {chunk}: factors identical; diagnostics max abs difference {worst}")


def test_spread_holds_no_tensor_growing_faster_than_the_requests(data_root) -> None:
    # 1500 requests: the keys (n, d_in) are the largest thing the spread needs; an (n, n) matrix (2.25M elements)
    # or every key row's activations at once (n * templates, d_in) is memory that grows faster than the edit.
    # One edited layer: with more, the forward passes of the upper layers' keys run through the lower layers' hooks,
    # whose (tokens of a batch, n) product x v^T belongs to the edited model's forward (benchmarks/memit_memory.py
    # measures it with the evaluation), not to the spread.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    module, requests, z = spread_setup(1500, layers=(2,), context_templates=1)
    templates = ["", "The quick brown fox. "]
    d_in = module.memit_v["2"].shape[1]
    largest = {"numel": 0, "shape": None, "op": None}

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() > largest["numel"]:
                    largest.update(numel=t.numel(), shape=tuple(t.shape), op=str(func))
            return out

    with torch.no_grad(), Largest():
        module.spread_targets(requests, templates, z)
    assert largest["numel"] <= len(requests) * d_in, (
        f"spread_targets made a {largest['shape']} tensor ({largest['op']}), more than the keys' {len(requests)} x "
        f"{d_in}")

"""The evaluation caches never serve a stale number (issue 34, items 1, 2, 4, 6 and 7 for the p0, frozen-prefix,
sense and MEMIT-target entries): a key that sees every change of what it covers, and entries checked when read.

Each test states the stale hit it guards against; each failed on the code before content hashes (commit 47bf641).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.evaluation.caching import CacheSettings, cache_root, evaluate_epoch, make_scorer
from editing.evaluation.incremental import COUNTERS, SenseEdit, clear_memory, prefix_digest, tensor_digest
from editing.methods import LoRAConfig, LoRAEditor, OptimizerConfig
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig, fingerprint, load_model

LIMITS = {"eval_limit": 5, "general_limit": 8}


@pytest.fixture
def counters():
    COUNTERS.clear()
    clear_memory()
    return COUNTERS


def _datamodule(module: EditingModule) -> TaskDataModule:
    dm = TaskDataModule(task="country_capital", **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def _lora() -> LoRAEditor:
    return LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"),
                      lora=LoRAConfig(rank=4, layer_start=2, layer_end=3), optimizer=OptimizerConfig(lr=1e-2))


def _rewrite_entry(path, change) -> None:
    """Rewrite a safetensors entry with changed tensors and the same metadata (what a disk fault or a hand edit
    that keeps the file readable leaves)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(change(tensors), str(path), metadata=meta)


# --- item 1: two sense selections with the same words and the same sum of sense indices -------------------------
def test_sense_selections_with_equal_sums_have_different_keys(data_root, counters) -> None:
    module = EditingModule(ModelConfig(name="tiny-backpack", precision="fp32"))
    dm = _datamodule(module)

    def key(senses: list[int]) -> str:
        edit = SenseEdit(vocab_ids=torch.tensor([11, 12]), sense_ids=torch.tensor(senses),
                         vectors=torch.zeros(2, module.model.config.n_embd), reference=lambda: None)
        from editing.evaluation.caching import data_material

        scorer = make_scorer(module.model, edit, module.identity, data_material(dm), CacheSettings())
        return scorer.store.key

    # (11, 0), (12, 3) and (11, 3), (12, 0): the same words, the same sum and sum of absolute sense indices
    assert key([0, 3]) != key([3, 0])
    assert key([0, 3]) == key([0, 3])


# --- item 2: digests of sums cannot see a permutation ------------------------------------------------------------
def test_a_permuted_weight_changes_every_digest() -> None:
    loaded = load_model(name="tiny-gpt2", precision="fp32")
    model = loaded.model
    before = (fingerprint(model), prefix_digest(model, 2), tensor_digest(sorted(model.state_dict().items())))
    weight = model.transformer.h[0].mlp.c_fc.weight
    with torch.no_grad():
        weight.copy_(weight.flip(0))  # the same values in another order: every sum and norm is unchanged
    after = (fingerprint(model), prefix_digest(model, 2), tensor_digest(sorted(model.state_dict().items())))
    assert [a != b for a, b in zip(before, after, strict=True)] == [True, True, True]
    # the block above the prefix is not part of the prefix's digest
    with torch.no_grad():
        top = model.transformer.h[2].mlp.c_fc.weight
        top.copy_(top.flip(0))
    assert prefix_digest(model, 2) == after[1]


# --- item 4: the code that computed an entry is part of its key ---------------------------------------------------
def test_a_changed_scoring_function_misses_the_p0_cache(data_root, counters, monkeypatch) -> None:
    import editing.evaluation.evaluator as evaluator_module

    module = _lora()
    dm = _datamodule(module)
    evaluate_epoch(module, dm, 0, announce=False)
    assert counters["p0_computed"] == 1
    original = evaluator_module.example_score
    # a context of its own: monkeypatch.undo() would also undo the autouse fixture's private cache folder
    with monkeypatch.context() as patch:
        patch.setattr(evaluator_module, "example_score", lambda sums, loss: original(sums, loss) + 1.0)
        patched = evaluate_epoch(module, dm, 0, announce=False)
        assert counters["p0_computed"] == 2 and counters["p0_reused"] == 0
        fresh = evaluate(module, dm)  # the plain loop, with the patched code
        assert [e["score"] for e in patched["per_example"]] == [e["score"] for e in fresh["per_example"]]
    evaluate_epoch(module, dm, 0, announce=False)  # back to the original code: its entry is still good
    assert counters["p0_reused"] == 1


# --- item 6: an entry's data is checked when read ----------------------------------------------------------------
def test_a_p0_entry_whose_data_changed_is_recomputed_and_says_so(data_root, counters, caplog) -> None:
    module = _lora()
    dm = _datamodule(module)
    reference = evaluate_epoch(module, dm, 0, announce=False)
    (entry,) = (cache_root() / "p0").glob("*.safetensors")
    _rewrite_entry(entry, lambda t: {k: (v * 0.9995 if v.is_floating_point() else v) for k, v in t.items()})
    with caplog.at_level(logging.WARNING):
        again = evaluate_epoch(module, dm, 0, announce=False)
    assert again == reference
    assert counters["p0_computed"] == 2 and counters["p0_reused"] == 0
    assert any(str(entry) in r.getMessage() and "content hash" in r.getMessage() for r in caplog.records)
    evaluate_epoch(module, dm, 0, announce=False)  # the recomputed entry replaced the damaged one
    assert counters["p0_reused"] == 1


def test_a_prefix_entry_on_disk_whose_data_changed_is_not_served(data_root, counters, caplog) -> None:
    module = _lora()
    dm = _datamodule(module)
    settings = CacheSettings(memory_mb=0)  # every captured prefix goes to disk
    reference = evaluate_epoch(module, dm, 1, settings, announce=False)
    files = sorted((cache_root() / "prefix").rglob("*.safetensors"))
    assert files and counters["prefix_captured"] == len(files)
    for path in files:
        _rewrite_entry(path, lambda t: {k: (v + 0.01 if v.is_floating_point() else v) for k, v in t.items()})
    with caplog.at_level(logging.WARNING):
        again = evaluate_epoch(module, dm, 1, settings, announce=False)
    assert again == reference and counters["prefix_reused"] == 0
    assert sum("content hash" in r.getMessage() for r in caplog.records) == len(files)


# --- item 7: a cache folder that cannot be written costs the cache, never the run ---------------------------------
@pytest.mark.parametrize("failure", ["no_space", "not_a_folder"])
def test_an_unwritable_cache_folder_costs_the_cache_not_the_evaluation(data_root, counters, monkeypatch, tmp_path,
                                                                        failure: str, caplog) -> None:
    module = _lora()
    dm = _datamodule(module)
    reference = evaluate(module, dm)
    if failure == "no_space":  # what safetensors raises when the disk fills up while it writes
        import safetensors.torch
        from safetensors import SafetensorError

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
    else:  # the cache folder's path runs through a file: no folder can be made there
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        monkeypatch.setenv("EDITING_EVAL_CACHE_DIR", str(blocker / "evaluation"))
    settings = CacheSettings(memory_mb=0)
    with caplog.at_level(logging.WARNING):
        p0 = evaluate_epoch(module, dm, 0, settings, announce=False)
        epoch = evaluate_epoch(module, dm, 1, settings, announce=False)
    assert p0 == reference and epoch == reference
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_an_edit_saved_with_the_old_sum_fingerprint_still_loads_and_a_wrong_one_is_refused(tmp_path) -> None:
    """Edits saved before content hashes recorded a 16-character fingerprint of per-tensor sums: they load on the
    model they name (recomputed the old way from the fp32 weights), and one naming other weights is refused."""
    import json

    from edit_kinds import make_edit

    from editing.core.errors import ConfigError
    from editing.edits.load import load_edited

    folder = make_edit("full", tmp_path / "edit", seed=1, scale=0.05)
    new = load_edited(folder)
    identity_file = folder / "base_model.json"
    identity = json.loads(identity_file.read_text())
    assert identity["fingerprint"].startswith("sha256:")
    # the old fingerprint, written here as the old code did: per-tensor sums and sums of absolute values
    import hashlib

    digest = hashlib.sha256()
    base = load_model(name="tiny-gpt2", precision="fp32").model
    for name, tensor in sorted(base.state_dict().items()):
        t = tensor.detach().to(torch.float64)
        digest.update(f"{name}:{tuple(tensor.shape)}:{t.sum().item():.10e}:{t.abs().sum().item():.10e};".encode())
    identity_file.write_text(json.dumps({**identity, "fingerprint": digest.hexdigest()[:16]}))
    old = load_edited(folder)
    for (name, a), (_, b) in zip(new.model.state_dict().items(), old.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    identity_file.write_text(json.dumps({**identity, "fingerprint": "0123456789abcdef"}))
    with pytest.raises(ConfigError, match="fingerprint"):
        load_edited(folder)

"""The evaluation caches of issue 13 (``editing.evaluation.caching``, ``editing.evaluation.incremental``).

p0 cache: p0's evaluation is computed once per (model, data, settings) and reused by every later fit, bit for bit;
any setting that changes p0's numbers misses it; a damaged or foreign entry is never read; a switch turns it off.
Incremental evaluation: every epoch's metrics equal a full evaluation's and every ball decision is the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.evaluation.caching import CacheSettings, P0Cache, cache_root, evaluate_epoch
from editing.evaluation.incremental import COUNTERS, clear_memory
from editing.methods import FullEditor, LoRAConfig, LoRAEditor, OptimizerConfig
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"eval_limit": 5, "general_limit": 8}


def lora(model: str = "tiny-gpt2", seed: int = 0, rank: int = 4) -> LoRAEditor:
    return LoRAEditor(ModelConfig(name=model, precision="fp32", seed=seed), lora=LoRAConfig(rank=rank),
                      optimizer=OptimizerConfig(lr=1e-2))


def fresh_p0(model: str = "tiny-gpt2", seed: int = 0, max_length: int | None = None, **data) -> dict:
    """p0's evaluation by the plain evaluation loop on the base model, no cache involved."""
    module = EditingModule(ModelConfig(name=model, precision="fp32", seed=seed))
    dm = TaskDataModule(task="country_capital", **{**LIMITS, **data})
    dm.attach(module.tokenizer, max_length or module.max_length)
    return evaluate(module, dm)


def p0_of(module: EditingModule, max_length: int | None = None, **data) -> dict:
    dm = TaskDataModule(task="country_capital", **{**LIMITS, **data})
    dm.attach(module.tokenizer, max_length or module.max_length)
    return evaluate_epoch(module, dm, 0, announce=False)


@pytest.fixture
def counters():
    COUNTERS.clear()
    return COUNTERS


# --- p0 cache ----------------------------------------------------------------------------------------------------
def test_p0_is_computed_once_and_reused_exactly_by_another_method(data_root, counters) -> None:
    first = p0_of(lora(rank=2))
    assert counters["p0_computed"] == 1 and counters["p0_reused"] == 0
    assert len(list((cache_root() / "p0").glob("*.safetensors"))) == 1
    # another method, another rank of LoRA: the same model and data, so the same p0
    second = p0_of(FullEditor(ModelConfig(name="tiny-gpt2", precision="fp32")))
    third = p0_of(lora(rank=8))
    assert counters["p0_computed"] == 1 and counters["p0_reused"] == 2
    reference = fresh_p0()
    assert first == reference and second == reference and third == reference  # every number and score, exactly
    assert reference["general_nll"] is not None and len(reference["per_example"]) == LIMITS["eval_limit"]


def _changed_data_root(tmp_path: Path, data_root: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(data_root / "country_capital", root / "country_capital")
    (root / "general").mkdir()
    shutil.copy(data_root / "general" / "regularization.jsonl", root / "general")
    lines = (data_root / "general" / "degradation.jsonl").read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["text"] = first["text"].replace("community", "committee", 1)
    (root / "general" / "degradation.jsonl").write_text(json.dumps(first) + "\n" + "".join(lines[1:]))
    return root


@pytest.mark.parametrize("change", ["general_limit", "eval_limit", "max_length", "max_tokens", "file", "weights"])
def test_a_changed_setting_misses_the_p0_cache(tmp_path, data_root, counters, change: str) -> None:
    p0_of(lora())
    assert counters["p0_computed"] == 1
    settings: dict = {"general_limit": 9} if change == "general_limit" else \
        {"eval_limit": 4} if change == "eval_limit" else \
        {"max_length": 40} if change == "max_length" else \
        {"max_tokens": 300} if change == "max_tokens" else \
        {"data_root": str(_changed_data_root(tmp_path, data_root))} if change == "file" else {}
    seed = 1 if change == "weights" else 0
    changed = p0_of(lora(seed=seed), **settings)
    assert counters["p0_computed"] == 2 and counters["p0_reused"] == 0, change
    assert changed == fresh_p0(seed=seed, **settings)
    # and the original setting still hits its own entry
    p0_of(lora())
    assert counters["p0_reused"] == 1


def test_a_damaged_or_foreign_entry_is_never_read(data_root, counters) -> None:
    reference = p0_of(lora())
    (entry,) = (cache_root() / "p0").glob("*.safetensors")
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])  # what an interrupted non-atomic write would leave
    assert p0_of(lora()) == reference
    assert counters["p0_computed"] == 2 and counters["p0_reused"] == 0
    # a readable entry written for other material (a key collision) is not served either
    module = lora()
    dm = TaskDataModule(task="country_capital", **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    good = P0Cache({"x": 1})
    good.store({"general_nll": {"nll": torch.tensor(1.0, dtype=torch.float64)}})
    entry.write_bytes(good.path.read_bytes())
    assert evaluate_epoch(module, dm, 0, announce=False) == reference
    assert counters["p0_computed"] == 3


def test_the_switches_turn_the_p0_cache_off(data_root, counters, monkeypatch) -> None:
    module = lora()
    dm = TaskDataModule(task="country_capital", **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    evaluate_epoch(module, dm, 0, CacheSettings(p0=False), announce=False)
    monkeypatch.setenv("EDITING_EVAL_CACHES", "off")
    evaluate_epoch(module, dm, 0, announce=False)
    assert counters["p0_computed"] == 0 and counters["p0_reused"] == 0
    assert not (cache_root() / "p0").exists()
    # a method that does not declare its pre-step model to be the base model is never served from the cache
    monkeypatch.delenv("EDITING_EVAL_CACHES")
    p0_of(lora())
    p0_of(EditingModule(ModelConfig(name="tiny-gpt2", precision="fp32")))
    assert counters["p0_computed"] == 1 and counters["p0_reused"] == 0


def test_a_three_trial_sweep_computes_p0_once(tmp_path, data_root) -> None:
    root = tmp_path / "sweeps"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    args = "--data.eval_limit 4 --data.general_limit 6 --trainer.max_epochs 1 --trainer.limit_train_batches 2"
    cmd = [sys.executable, "-m", "editing.cli", "sweep", "--task", "country_capital", "--method", "lora", "--model",
           "tiny-gpt2", "--n_trials", "3", "--root", str(root), "--study_name", "p0", f"--args={args}",
           "--params", '{"model.init_args.lora.rank": {"int_uniform": [1, 8]}}']
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    logs = [(root / "p0" / f"trial_{n}" / "fit.log").read_text() for n in range(3)]
    computed = sum(log.count("p0 (epoch 0): computed") for log in logs)
    reused = sum(log.count("p0 (epoch 0): reused") for log in logs)
    assert (computed, reused) == (1, 2)
    records = [json.loads((root / "p0" / f"trial_{n}" / "results.json").read_text()) for n in range(3)]
    assert len({json.dumps(r["epochs"][0], sort_keys=True) for r in records}) == 1  # the same p0 in every trial


# --- incremental evaluation --------------------------------------------------------------------------------------
BALLS = [1e-3, 1e-4, 1e-5, 1e-6]


def make(method: str, model: str):
    base = ModelConfig(name=model, precision="fp32")
    if method == "lora":  # a block of the upper layers
        return LoRAEditor(base, lora=LoRAConfig(rank=4, layer_start=2, layer_end=3), optimizer=OptimizerConfig(lr=3e-2))
    if method == "full":  # a full finetune of one middle block
        return FullEditor(base, layers=[1], optimizer=OptimizerConfig(lr=1e-3))
    if method == "senses":
        from editing.methods import SensesConfig, SensesEditor

        return SensesEditor(base, senses=SensesConfig(senses_per_example=5, selection_lambda=100.0),
                            optimizer=OptimizerConfig(lr=3e-2))
    from editing.methods.memit.config import MEMITConfig
    from editing.methods.memit.module import MEMITEditor

    return MEMITEditor(base, MEMITConfig(layers=[1, 2], covariance_weight=10.0, covariance_samples=1500,
                                         context_templates=1, context_template_length=4, steps=10))


def fit(tmp_path: Path, method: str, model: str, name: str, caches: bool, monkeypatch,
        memory_mb: float = 1024.0) -> tuple[list[dict], list[dict], DegradationBudget]:
    """A fit's epoch records, its evaluation summaries (with per-example scores) and its callback."""
    import callbacks.degradation_budget as budget_module

    summaries: list[dict] = []

    def recording(*args, **kwargs):
        summaries.append(evaluate_epoch(*args, **kwargs))
        return summaries[-1]

    monkeypatch.setattr(budget_module, "evaluate_epoch", recording)
    L.seed_everything(0)
    module = make(method, model)
    dm = TaskDataModule(task="country_capital", eval_limit=6, general_limit=10, max_examples=4)
    budget = DegradationBudget(balls=BALLS, output_dir=str(tmp_path / name), save_edits=False, p0_cache=caches,
                               incremental=caches, cache_memory_mb=memory_mb)
    L.Trainer(max_epochs=3, limit_train_batches=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              default_root_dir=str(tmp_path), callbacks=[budget], enable_checkpointing=False).fit(module, dm)
    return budget.history, summaries, budget


def assert_same_fit(full: tuple, cached: tuple) -> None:
    """Every epoch's metrics within 1e-6 relative, the same counts and per-example decisions, the same balls."""
    (hist_a, sums_a, budget_a), (hist_b, sums_b, budget_b) = full, cached
    assert [h["epoch"] for h in hist_a] == [h["epoch"] for h in hist_b]
    for a, b in zip(hist_a, hist_b, strict=True):
        assert a["counts"] == b["counts"]
        for key in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll", "degradation"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=0), (a["epoch"], key)
    for a, b in zip(sums_a, sums_b, strict=True):
        assert [e["failed"] for e in a["per_example"]] == [e["failed"] for e in b["per_example"]]
        assert [e["score"] for e in b["per_example"]] == pytest.approx([e["score"] for e in a["per_example"]],
                                                                      rel=1e-6)
    p0_a, p0_b = hist_a[0]["general_nll"], hist_b[0]["general_nll"]
    inside_a = [[ball.inside(h["general_nll"], p0_a) for ball in budget_a.balls] for h in hist_a]
    inside_b = [[ball.inside(h["general_nll"], p0_b) for ball in budget_b.balls] for h in hist_b]
    assert inside_a == inside_b
    assert {k: r.epoch for k, r in budget_a.summary().items()} == {k: r.epoch for k, r in budget_b.summary().items()}


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", ["lora", "memit", "full"])
def test_incremental_evaluation_equals_full_evaluation(tmp_path, data_root, counters, monkeypatch, method: str,
                                                      model: str) -> None:
    full = fit(tmp_path, method, model, "full", False, monkeypatch)
    assert not counters  # the caches were off: every pass ran every block
    cold = fit(tmp_path, method, model, "cold", True, monkeypatch)
    assert counters["p0_computed"] == 1 and counters["prefix_reused"] > 0 and counters["full_passes"] == 0
    assert_same_fit(full, cold)
    # the edit changed the metrics: the test compares edited models, not p0 with itself
    assert full[0][-1]["general_nll"] != full[0][0]["general_nll"]
    captured = counters["prefix_captured"]
    chunks = counters["memit_targets_computed"]  # one entry per batch of requests
    assert (chunks > 0) == (method == "memit") and not counters["memit_targets_reused"]
    warm = fit(tmp_path, method, model, "warm", True, monkeypatch)  # a second fit on the same model and data
    assert counters["p0_reused"] == 1 and counters["prefix_captured"] == captured  # all from memory
    # MEMIT's targets are p0's numbers too: the warm fit read them all (the off fit neither read nor wrote them)
    assert counters["memit_targets_reused"] == chunks and counters["memit_targets_computed"] == chunks
    assert_same_fit(full, warm)


def test_memit_targets_are_shared_by_fits_that_differ_only_in_the_solve(data_root, counters) -> None:
    """The targets depend on p0 and the target settings: a fit with another covariance weight reads them (and its
    edit is that of a fresh computation with that weight); another clamp computes its own."""
    import dataclasses

    from editing.methods.memit.config import MEMITConfig
    from editing.methods.memit.module import MEMITEditor

    cfg = MEMITConfig(layers=[1, 2], covariance_weight=10.0, covariance_samples=1500, context_templates=1,
                      context_template_length=4, steps=4)

    def edit(reuse: bool, **change) -> MEMITEditor:
        module = MEMITEditor(ModelConfig(name="tiny-llama", precision="fp32"), dataclasses.replace(cfg, **change))
        module.reuse_base_numbers = reuse
        dm = TaskDataModule(task="country_capital", eval_limit=6, general_limit=10, max_examples=4)
        module.compute_edit(dm, progress=False)
        return module

    edit(True)
    chunks = counters["memit_targets_computed"]  # one entry per batch of requests
    assert chunks >= 1
    other_weight = edit(True, covariance_weight=50.0)
    assert counters["memit_targets_reused"] == chunks
    fresh = edit(False, covariance_weight=50.0)
    assert counters["memit_targets_computed"] == chunks  # reuse off: computed, and neither read nor stored
    torch.testing.assert_close(other_weight.edit_diagnostics["targets"], fresh.edit_diagnostics["targets"],
                               rtol=0, atol=0)
    for layer, delta in fresh.weight_deltas().items():
        torch.testing.assert_close(other_weight.weight_deltas()[layer], delta, rtol=0, atol=0)
    edit(True, clamp_norm_factor=0.3)
    assert counters["memit_targets_computed"] == 2 * chunks and counters["memit_targets_reused"] == chunks
    assert len(list((cache_root() / "memit_targets").glob("*.safetensors"))) == 2 * chunks


def test_entries_beyond_the_memory_budget_go_to_disk_and_serve_later_fits(tmp_path, data_root, counters,
                                                                         monkeypatch) -> None:
    full = fit(tmp_path, "lora", "tiny-llama", "full", False, monkeypatch)
    cold = fit(tmp_path, "lora", "tiny-llama", "cold", True, monkeypatch, memory_mb=0)
    files = list((cache_root() / "prefix").rglob("*.safetensors"))
    assert files and counters["prefix_captured"] == len(files)
    clear_memory()  # a later process: only the disk entries remain
    reused = counters["prefix_reused"]
    warm = fit(tmp_path, "lora", "tiny-llama", "warm", True, monkeypatch, memory_mb=0)
    assert counters["prefix_reused"] > reused
    assert_same_fit(full, cold)
    assert_same_fit(full, warm)


def test_a_changed_frozen_weight_is_never_served_a_stale_prefix(data_root, counters) -> None:
    module = make("lora", "tiny-gpt2")
    dm = TaskDataModule(task="country_capital", **LIMITS)
    dm.attach(module.tokenizer, module.max_length)
    evaluate_epoch(module, dm, 1, announce=False)
    evaluate_epoch(module, dm, 1, announce=False)
    assert counters["prefix_reused"] > 0
    with torch.no_grad():  # a weight below the LoRA block changes (which no method does): the cache must notice
        next(module.model.base_model.model.transformer.h[0].parameters()).add_(0.05)
    reused = counters["prefix_reused"]
    changed = evaluate_epoch(module, dm, 1, announce=False)
    assert counters["prefix_reused"] == reused
    assert changed == evaluate(module, dm)


def test_sense_edit_evaluation_equals_full_evaluation(tmp_path, data_root, counters, monkeypatch) -> None:
    full = fit(tmp_path, "senses", "tiny-backpack", "full", False, monkeypatch)
    assert not counters
    cold = fit(tmp_path, "senses", "tiny-backpack", "cold", True, monkeypatch)
    # each batch's p0 values are built once (in p0's pass, the deltas being selected by then), and each of the
    # three edited epochs recomputes only the positions a selected sense reaches
    assert counters["senses_built"] > 0 and counters["senses_reused"] == 3 * counters["senses_built"]
    assert counters["full_passes"] == 0
    assert_same_fit(full, cold)
    assert full[0][-1]["general_nll"] != full[0][0]["general_nll"]
    built = counters["senses_built"]
    warm = fit(tmp_path, "senses", "tiny-backpack", "warm", True, monkeypatch)
    assert counters["p0_reused"] == 1 and counters["senses_built"] == built  # all from memory
    assert_same_fit(full, warm)


@pytest.mark.parametrize("layers", [[4], [-1], [1, 1], [], [True]])
def test_a_full_finetune_of_blocks_outside_the_model_is_refused(layers: list) -> None:
    from editing.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--model.init_args.layers=.*0\.\.3"):
        FullEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), layers=layers)


def test_a_full_finetune_of_one_block_trains_only_that_block() -> None:
    from editing.evaluation.incremental import FrozenPrefix
    from editing.models.architecture import blocks

    module = FullEditor(ModelConfig(name="tiny-llama", precision="fp32"), layers=[2])
    expected = {id(p) for p in blocks(module.model)[2].parameters()}
    assert {id(p) for p in module.trainable_parameters().values()} == expected
    assert module.evaluation_shortcut() == FrozenPrefix(2)
    assert FullEditor(ModelConfig(name="tiny-llama", precision="fp32")).evaluation_shortcut() is None

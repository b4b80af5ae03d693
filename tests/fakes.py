"""Fakes and references shared by test files in several folders (a fake fit of the sweep tests, results records,
a scripted degradation-budget fit, a Backpack edit, the reference tokenization of one example).

They lived in the test files that first needed them; the tests of other folders import them from here.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import lightning as L
import torch

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.methods import (
    FullEditor,
    LoRAConfig,
    LoRAEditor,
    SensesConfig,
    SensesEditor,
)
from editing.models.loading import ModelConfig
from editing.runs.records import BallRecord, EpochRecord, Metrics, RunRecord, TaskRef


# from tests/rules/test_budget.py
def scripted_fit(tmp_path, monkeypatch, factors: list[float], epochs: int, reliability: list[float] | None = None,
                 **budget_kw) -> dict:
    """A tiny LoRA fit whose general NLL after epoch e is ``factors[e]`` x the real epoch-0 value (and, when given,
    whose reliability is ``reliability[e]``; the training and the rest of the evaluation are real)."""
    import json

    import callbacks.degradation_budget as budget_module
    from editing.evaluation.caching import evaluate_epoch as real
    from editing.methods import LoRAConfig, LoRAEditor
    from editing.models.loading import ModelConfig

    seen: list[float] = []

    def scripted(module, datamodule, *args, **kw):
        summary = real(module, datamodule, *args, **kw)
        if not seen:
            seen.append(summary["general_nll"])
        summary["general_nll"] = seen[0] * factors[len(seen) - 1]
        if reliability is not None:
            summary["reliability"] = reliability[len(seen) - 1]
        seen.append(summary["general_nll"])
        return summary

    monkeypatch.setattr(budget_module, "evaluate_epoch", scripted)
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2))
    dm = TaskDataModule(task="stereoset", eval_limit=2, general_limit=2)
    budget = DegradationBudget(output_dir=str(tmp_path / "run"), **budget_kw)
    L.Trainer(max_epochs=epochs, limit_train_batches=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[budget]).fit(module, dm)
    return json.loads((tmp_path / "run" / "results.json").read_text())


# from tests/rules/test_spec_numbers.py
def ref_example(tok, record: dict) -> list[tuple[list[int], int]]:
    """SPEC 3: per suffix, (prefix ids + separately tokenized suffix ids, index of the first scored token)."""
    prefix = tok(record["prefix"])["input_ids"]
    suffixes = [record["suffix"]] if "suffix" in record else [record["suffix1"], record["suffix2"]]
    return [(prefix + tok(s, add_special_tokens=False)["input_ids"], len(prefix)) for s in suffixes]


# from tests/commands/test_devices.py
def _dm(module, task: str = "country_capital") -> TaskDataModule:
    dm = TaskDataModule(task=task, eval_limit=4, general_limit=5)
    dm.attach(module.tokenizer, module.max_length)
    return dm


def _backpack_edit(kind: str, folder, data_root) -> None:
    base = ModelConfig(name="tiny-backpack", precision="fp32")
    if kind == "senses":
        module = SensesEditor(base, senses=SensesConfig(senses_per_example=3, background_limit=6))
        module.select(_dm(module))
        name = "sense_deltas"
    elif kind == "lora":
        module = LoRAEditor(base, lora=LoRAConfig(rank=2, layer_fraction=1.0))
        name = "lora_"
    else:  # full finetuning: its edit is the changed tensors, whose base values the loaded edit keeps
        module = FullEditor(base, gradient_checkpointing=False)
        name = ".mlp.c_proj."
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if p.requires_grad and name in n:
                p.add_(torch.randn(p.shape, generator=generator))
    module.export_edit(folder)


# from tests/protocol/test_sweep.py
def fake_results(gain_by_ball: dict[str, tuple[int, float]], seed: int = 0, initial: float = 0.5,
                 task: str = "country_capital") -> dict:
    """A results.json as DegradationBudget writes it, with made-up numbers: per ball (epoch, success change in pp)."""
    last = max(e for e, _ in gain_by_ball.values())
    success = {e: initial for e in range(last + 1)}
    for epoch, gain in gain_by_ball.values():
        success[epoch] = initial + gain / 100

    def metrics(e: int) -> Metrics:
        return Metrics(success_rate=success[e], general_nll=3.0, targeted_nll=2.0, hard_negative_nll=10.0 + 0.1 * e,
                       degradation=1e-6 * e)

    epochs = [EpochRecord(e, metrics(e), {"evaluation": 10}) for e in range(last + 1)]
    balls = {key: BallRecord(epoch, metrics(epoch), gain) for key, (epoch, gain) in gain_by_ball.items()}
    return RunRecord(method="lora", task=TaskRef(task, "good", 1.6), split="test",
                     model={"name": "tiny", "num_parameters": 1000}, seed=seed, config=None, hyperparameters={},
                     status="finished", diverged_at_epoch=None, stopped_early=None, epochs=epochs,
                     balls=balls).to_dict()


# from tests/protocol/test_sweep.py
class FakeFit:
    """Stands for `editing fit`: writes a results.json whose gains come from the sampled learning rate."""

    def __init__(self, delay: float = 0.2) -> None:
        self.delay = delay
        self.calls: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, args: list[str], log_path: Path) -> int:
        with self.lock:
            self.calls.append(list(args))
        time.sleep(self.delay)
        out = Path(args[args.index("--budget.output_dir") + 1])
        lr = float(args[args.index("--model.init_args.optimizer.lr") + 1])
        gain = round(-10 * math.log10(lr), 3)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(fake_results({"1e-03": (2, gain), "1e-05": (1, gain / 2)})))
        return 0


class FakeTestRun:
    """A test run's fit: writes ``fake_results`` of the seed on its command line into its output folder and records
    every command line in ``calls`` (shared by the sweep and interruption tests of ``editing test-runs``)."""

    def __init__(self, balls: dict[str, tuple[int, float]] | None = None) -> None:
        self.balls = balls or {"1e-03": (2, 5.0), "1e-05": (1, 1.0)}
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], log_path) -> int:
        self.calls.append(args)
        out = Path(args[args.index("--budget.output_dir") + 1])
        out.mkdir(parents=True, exist_ok=True)
        seed = int(args[args.index("--seed_everything") + 1])
        (out / "results.json").write_text(json.dumps(fake_results(self.balls, seed)))
        return 0


@contextmanager
def benchmark_module(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` imported as module ``name`` (its dataclasses look the module up in ``sys.modules``),
    taken out of ``sys.modules`` again on exit."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)

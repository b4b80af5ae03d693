"""Issue 36 item 6: a fit of one's own task (``edit()``, ``editing fit --data.task <task YAML>``) takes auto's
small-data rule and measures the degradation on a growing sample of G; the paper's protocol keeps its settings."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from jsonargparse import Namespace

from callbacks.degradation_budget import DegradationBudget
from editing.commands.practitioner import apply_small_data
from editing.data.datamodule import TaskDataModule
from editing.evaluation.evaluator import evaluate
from editing.methods import LoRAConfig, LoRAEditor
from editing.models.loading import ModelConfig
from editing.protocol.auto import SmallData
from editing.protocol.trials import PAPER_PROTOCOL, FitSettings
from editing.rules.sampling import Interval

FACTS = [{"prefix": f"The secret word of person {i} is", "suffix": f" w{i}"} for i in range(12)]


def _config(task: str, accumulate: int = 5, epochs: int = 10, small_data=None) -> Namespace:
    return Namespace(data=Namespace(task=task, split="val", data_root=None),
                     trainer=Namespace(accumulate_grad_batches=accumulate, max_epochs=epochs), small_data=small_data)


def _own_task(tmp_path: Path, n: int = 12) -> str:
    (tmp_path / "canon.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FACTS[:n]))
    (tmp_path / "own.yaml").write_text("name: own\nloss: good\nthreshold: 1.6\ncanonical: canon.jsonl\n"
                                       "evaluation: canon.jsonl\n")
    return str(tmp_path / "own.yaml")


def test_own_task_takes_the_small_data_rule_and_a_built_in_task_keeps_the_papers(tmp_path, data_root):
    own = _own_task(tmp_path)
    config = _config(own)
    assert apply_small_data(config, []) is not None
    rule = SmallData.of(12)
    assert (config.trainer.accumulate_grad_batches, config.trainer.max_epochs) == (rule.accumulate, rule.max_epochs)
    assert (rule.accumulate, rule.max_epochs) == (1, 10)  # 12 examples: 12 steps an epoch, not 2
    # epochs given: kept, with the rule's accumulation
    config = _config(own, epochs=3)
    apply_small_data(config, ["--trainer.max_epochs", "3"])
    assert (config.trainer.accumulate_grad_batches, config.trainer.max_epochs) == (1, 3)
    # the paper's protocol and the user's own accumulation are left alone
    for config, args in ((_config("country_capital"), []), (_config(own, small_data=False), []),
                         (_config(own, accumulate=3), ["--trainer.accumulate_grad_batches=3"]),
                         (_config(own, accumulate=1, epochs=1), [])):  # MEMIT: no accumulation, one epoch
        before = config.clone()
        assert apply_small_data(config, args) is None
        assert config == before
    # sweeps' trials and test runs say so explicitly
    args = FitSettings(Path("base.yaml"), own, "tiny-gpt2", tmp_path).args()
    assert args[args.index("--small_data") + 1] == "false"
    assert args[args.index("--budget.general_sample") + 1] == "all"
    assert set(PAPER_PROTOCOL) <= set(args)


def _fit(tmp_path, task: str, epochs: int = 2, **budget) -> dict:
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=2))
    dm = TaskDataModule(task=task, eval_limit=2, general_limit=100)
    out = tmp_path / f"run_{budget.get('general_sample', 'default')}_{Path(task).stem}"
    cb = DegradationBudget(output_dir=str(out), balls=[1e-3, 1e-5], save_edits=False, p0_cache=False,
                           incremental=False, **budget)
    L.Trainer(max_epochs=epochs, limit_train_batches=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[cb]).fit(module, dm)
    return json.loads((out / "results.json").read_text()), module, dm


def test_own_task_samples_g_and_all_keeps_the_full_evaluation(tmp_path, data_root, capsys):
    torch.set_num_threads(1)
    own = _own_task(tmp_path)
    sampled, _, _ = _fit(tmp_path, own)  # auto: a task of one's own is sampled
    out = capsys.readouterr().out
    assert "measured on a sample of G" in out and "CI on" in out  # the interval printed beside the degradation
    for epoch in sampled["epochs"][1:]:
        s = epoch["general_sample"]
        iv = Interval(s["degradation"], s["low"], s["high"], s["level"], s["texts"], s["total"])
        assert s["total"] == 100 and s["texts"] in (64, 100) and s["level"] == 0.95
        assert epoch["degradation"] == s["degradation"]
        assert iv.clears([1e-3, 1e-5])  # it grew until every ball's decision was made
    for key, ball in sampled["balls"].items():
        chosen = sampled["epochs"][ball["epoch"]]
        if ball["epoch"] > 0:
            s = chosen["general_sample"]
            assert Interval(s["degradation"], s["low"], s["high"], s["level"], s["texts"], s["total"]).inside(
                float(key)) is True
    # all: the paper's evaluation, every text every epoch, no sample recorded
    full, module, dm = _fit(tmp_path, own, general_sample="all")
    assert all("general_sample" not in e for e in full["epochs"])
    dm.attach(module.tokenizer, module.max_length)
    with module.reference() as model:
        p0 = evaluate(type("S", (), {"model": model, "tokenizer": module.tokenizer,
                                     "max_length": module.max_length})(), dm, roles=["general"])["general_nll"]
    assert full["epochs"][0]["general_nll"] == p0  # the Evaluator's own number, exactly
    # the same training either way: the trained epochs' success and reliability agree
    assert [e["reliability"] for e in full["epochs"]] == [e["reliability"] for e in sampled["epochs"]]


def test_a_built_in_task_keeps_all_of_g(tmp_path, data_root):
    default, _, _ = _fit(tmp_path, "stereoset", epochs=1)
    explicit, _, _ = _fit(tmp_path, "stereoset", epochs=1, general_sample="all")
    assert all("general_sample" not in e for e in default["epochs"])
    assert default["epochs"] == explicit["epochs"]


@pytest.mark.parametrize("value", ["most", 1])
def test_a_bad_sample_setting_is_a_clear_error(value):
    from editing.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--budget.general_sample"):
        DegradationBudget(general_sample=value)

"""The metrics a practitioner reads beside the paper's (issue 14 item 3): reliability, generalization's mean score and
locality, computed at p0 and after every epoch, logged and written to the results.

The matrix of methods x loss types x balls checks every one of them against the SPEC reference in
``tests/rules/test_spec_numbers.py``; here: the locality rule itself, locality moving (hard negatives pushed away by a
``bad`` edit), the logged columns of ``metrics.csv``, and records of earlier schemas reading the new fields as missing.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO_DIR, SHARED_DATA, reference_sequence_nll
from fakes import ref_example

from callbacks.degradation_budget import DegradationBudget
from editing.core.types import Metric
from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.evaluation.locality import LOCALITY_TOLERANCE, preserved_rate
from editing.methods import LoRAConfig, LoRAEditor, OptimizerConfig
from editing.models.loading import ModelConfig
from editing.runs.records import EpochRecord, Metrics, RunRecord

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"


def test_locality_rule() -> None:
    """Preserved: the value rose by at most ln 2 nats from p0's (the true completion keeps half its probability);
    non-finite values and missing examples are not preserved; no hard negatives: None."""
    assert LOCALITY_TOLERANCE == pytest.approx(math.log(2))
    p0 = {0: 0.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}
    now = {0: math.log(2), 1: 2.0 + math.log(2) + 1e-6, 2: 0.5, 3: float("nan"), 4: float("inf")}
    assert preserved_rate(p0, now) == 2 / 5  # 0 (exactly at the tolerance) and 2 (fell)
    assert preserved_rate(p0, {0: 0.0}) == 1 / 5  # the others are missing
    assert preserved_rate(p0, p0) == 1.0
    assert preserved_rate({0: float("nan")}, {0: float("nan")}) == 0.0
    assert preserved_rate({}, {}) is None


def _lines(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def _bad_task(folder: Path) -> Path:
    """A ``bad`` task (push the suffixes away) whose hard negatives include its own canonical lines, so that the
    edit must lower locality, and lines of another task it may leave alone."""
    split = SHARED_DATA / "stereoset" / "split"
    canonical = _lines(split / "stereoset_train-val.jsonl", 4)
    others = _lines(SHARED_DATA / "country_capital" / "split" / "country_capital_hard_neg-val.jsonl", 4)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("canonical", canonical), ("evaluation", _lines(split / "stereoset_eval_clear-val.jsonl", 4)),
                       ("hard", [{"prefix": r["prefix"], "suffix": r["suffix"]} for r in canonical + others])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text("name: pushed\nloss: bad\nthreshold: -6.907755278982137\n"
                                      "canonical: canonical.jsonl\nevaluation: evaluation.jsonl\n"
                                      "hard_negatives: hard.jsonl\n")
    return folder / "task.yaml"


class HardValues(L.Callback):
    """The reference: each hard negative's suffix NLL sum, by the plain loop, at p0 and after every epoch."""

    def __init__(self, rows: list[dict], tok) -> None:
        self.sequences = [ref_example(tok, r)[0] for r in rows]
        self.values: list[list[float]] = []

    def _measure(self, module) -> None:
        was = module.model.training
        module.model.eval()
        self.values.append([sum(reference_sequence_nll(module.model, ids, start)) for ids, start in self.sequences])
        module.model.train(was)

    def on_fit_start(self, trainer, module) -> None:
        self._measure(module)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._measure(module)


def test_locality_falls_when_an_edit_pushes_hard_negatives_away(tmp_path, data_root) -> None:
    task = _bad_task(tmp_path / "task")
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4),
                        optimizer=OptimizerConfig(lr=0.3))
    reference = HardValues(_lines(tmp_path / "task" / "hard.jsonl", 8), module.tokenizer)
    budget = DegradationBudget(balls=[0.5], output_dir=str(tmp_path / "run"))
    L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, enable_checkpointing=False,
              default_root_dir=str(tmp_path), callbacks=[budget, reference]).fit(
        module, TaskDataModule(task=str(task), general_limit=4))
    epochs = json.loads((tmp_path / "run" / "results.json").read_text())["epochs"]
    p0 = reference.values[0]
    expected = [sum(b - a <= math.log(2) for a, b in zip(p0, values, strict=True)) / len(p0)
                for values in reference.values]
    assert [e["locality"] for e in epochs] == expected
    assert expected[0] == 1.0 and min(expected) < 1.0  # the edit did push some hard negatives away
    # the p0 values are kept in the callback's checkpointed state (a resumed run measures against them)
    state = budget.state_dict()["p0_hard_negatives"]
    assert [state[i] for i in range(len(p0))] == pytest.approx(p0, rel=1e-6)


def test_reliability_is_scored_only_where_asked(tiny_module, data_root) -> None:
    """``validate``/``test`` keep their evaluation roles; the fit's evaluation adds the canonical examples."""
    dm = TaskDataModule(task="country_capital", eval_limit=3, general_limit=2)
    module = tiny_module("tiny-gpt2")
    plain = evaluate(module, dm)
    assert plain["reliability"] is None and "canonical" not in plain["counts"]
    assert plain["generalization_mean_score"] == pytest.approx(
        sum(p["score"] for p in plain["per_example"]) / len(plain["per_example"]), rel=1e-12)
    both = evaluate(module, dm, roles=dm.eval_roles(canonical=True))
    assert both["counts"]["canonical"] == len(dm.load("canonical").examples)
    assert both["reliability"] == 1.0 - both["counts"]["canonical_failed"] / both["counts"]["canonical"]


def _env(cwd: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_metrics_csv_logs_the_practitioner_metrics_every_epoch(tmp_path, data_root) -> None:
    task = _bad_task(tmp_path / "task")
    cmd = [sys.executable, "-m", "editing.cli", "fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2",
           "--model.lora.rank", "4", "--model.optimizer.lr", "0.1", "--data.task", str(task),
           "--data.general_limit", "4", "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
           "--budget.balls", "[0.5]", "--trainer.default_root_dir", str(tmp_path / "runs"),
           "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "fit" / "version_0"
    epochs = json.loads((run / "results.json").read_text())["epochs"]
    with open(run / "metrics.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/general_nll")]
    assert len(rows) == len(epochs) == 3
    for row, epoch in zip(rows, epochs, strict=True):
        for name in ("reliability", "reliability_mean_score", "generalization_mean_score", "locality"):
            assert float(row[f"val/{name}"]) == pytest.approx(epoch[name], rel=1e-6), name
        assert float(row["val/generalization"]) == float(row["val/success_rate"]) == pytest.approx(
            epoch["success_rate"])
    assert epochs[0]["locality"] == 1.0
    # the ball's record carries them too
    ball = json.loads((run / "results.json").read_text())["balls"]["5e-01"]
    assert ball["metrics"]["reliability"] == epochs[ball["epoch"]]["reliability"]


@pytest.mark.parametrize("name", ["results_schema1.json", "results_stopped_early_schema1.json"])
def test_older_results_read_the_new_metrics_as_missing(name: str) -> None:
    record = RunRecord.read(FIXTURES / name)
    for epoch in record.epochs:
        m = epoch.metrics
        assert (m.reliability, m.reliability_mean_score, m.generalization_mean_score, m.locality) == (None,) * 4
        assert m.generalization == m.success_rate
        assert "reliability" not in epoch.to_dict()  # written only when measured: the old layout is unchanged


def test_new_metrics_round_trip() -> None:
    summary = {"success_rate": 0.5, "general_nll": 3.0, "targeted_nll": 4.0, "hard_negative_nll": 5.0,
               "reliability": 0.75, "reliability_mean_score": 1.25, "generalization_mean_score": 2.5,
               "locality": 0.875, "counts": {"evaluation": 2}}
    record = EpochRecord.of(1, summary, 2.0)
    data = record.to_dict()
    assert {k: data[k] for k in ("reliability", "reliability_mean_score", "generalization_mean_score", "locality")} \
        == {"reliability": 0.75, "reliability_mean_score": 1.25, "generalization_mean_score": 2.5, "locality": 0.875}
    assert EpochRecord.from_dict(data) == record
    assert record.metrics[Metric.LOCALITY] == 0.875 and record.metrics[Metric.GENERALIZATION] == 0.5
    assert Metrics.of(summary).to_dict()["reliability"] == 0.75

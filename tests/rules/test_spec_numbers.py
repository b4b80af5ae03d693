"""Every number a run reports, against an independent reference written here from SPEC (issue 11 item 7).

A tiny fit per (method, loss type) on a user task made of the first lines of a built-in task's files. At epoch 0 and
after every epoch, plain loops written in this file compute, one sequence at a time with full logits and a float64
log-softmax (``conftest.reference_sequence_nll``; nothing of the package's tokenization, batching, scoring, losses or
ball rule is used):

- SPEC 3: the token ids (prefix ids, then each suffix tokenized alone; ``<|endoftext|>`` as the separator token);
- SPEC 5: each evaluation example's score, its failure (score > threshold, or not finite) and the success rate;
  the token-mean NLL on G and on the targeted file; the hard-negative mean (suffix lines: the suffix NLL sum; text
  lines: the text's token-mean NLL);
- SPEC 4: the training loss of every batch (mean over suffix tokens, combined per loss type, averaged over the batch),
  measured on the weights the training step sees;
- SPEC 6: the degradation, the reported epoch per ball (the last epoch strictly inside (1 + eps) x epoch 0's general
  NLL) and the success change in percentage points.
- issue 14: reliability (the success rate and mean score on the canonical examples themselves), the evaluation set's
  mean score, and locality (the fraction of hard negatives whose value rose by at most ln 2 nats from p0's).

They are compared with what the package reports: ``evaluate()`` (per-example scores and failures), the logged
``train/task_loss`` and the run's ``results.json`` (per-epoch metrics and the per-ball summary).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
from conftest import SHARED_DATA, reference_sequence_nll
from fakes import ref_example

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.methods import (
    FullEditor,
    LoRAConfig,
    LoRAEditor,
    MEMITConfig,
    MEMITEditor,
    OptimizerConfig,
    SensesConfig,
    SensesEditor,
)
from editing.models.loading import ModelConfig

SEPARATOR = "<|endoftext|>"
BALLS = (1e-2, 1e-3, 1e-4, 1e-5)
# SPEC section 2: (canonical, evaluation, targeted, hard negatives) stems of the validation split
FILES = {
    "country_capital": ("country_capital_fixed", "country_capital_clear_eval", "country_capital_unconditional",
                        "country_capital_hard_neg"),
    "stereoset": ("stereoset_train", "stereoset_eval_clear", "stereoset_unconditional", "stereoset_hard_neg"),
    "pronoun_gender_bias": ("pronoun_gender_bias_train", "pronoun_gender_bias_eval",
                            "pronoun_gender_bias_unconditional", "pronoun_gender_bias_hard_neg_eval"),
    "verb_conjugation": ("verb_conjugation_train", "verb_conjugation_eval", "verb_conjugation_eval_unconditional",
                         "verb_conjugation_hard_neg_eval"),
}
N_CANONICAL, N_EVAL, N_GENERAL = 6, 8, 4

# (method, model, task whose files are used, loss type, hard-negative format, learning rate)
CASES = [
    pytest.param("lora", "tiny-gpt2", "country_capital", "good", "suffix", 3e-2, id="lora-good"),
    pytest.param("lora", "tiny-gpt2", "stereoset", "bad", "suffix", 3e-2, id="lora-bad"),
    pytest.param("lora", "tiny-gpt2", "pronoun_gender_bias", "balance", "suffix", 3e-2, id="lora-balance"),
    pytest.param("lora", "tiny-gpt2", "verb_conjugation", "good-v-bad", "text", 3e-2, id="lora-good-v-bad"),
    pytest.param("full", "tiny-gpt2", "verb_conjugation", "good-v-bad", "suffix", 1e-3, id="full-good-v-bad"),
    pytest.param("senses", "tiny-backpack", "pronoun_gender_bias", "balance", "text", 5e-2, id="senses-balance"),
    pytest.param("memit", "tiny-gpt2", "country_capital", "good", "suffix", 0.0, id="memit-good"),
]


# --- the reference, from SPEC -------------------------------------------------------------------------------------



def ref_text(tok, text: str) -> tuple[list[int], int]:
    """SPEC 3: a whole text scores every position but the first; the leading separator is the separator token."""
    if text.startswith(SEPARATOR):
        return [tok.eos_token_id] + tok(text[len(SEPARATOR):])["input_ids"], 1
    return tok(text)["input_ids"], 1


def ref_score(sums: list[float], loss: str) -> float:
    """SPEC 5, from the SUM of each suffix's token NLL."""
    return {"good": lambda: sums[0], "bad": lambda: -sums[0], "balance": lambda: abs(sums[0] - sums[1]),
            "good-v-bad": lambda: sums[0] - sums[1]}[loss]()


def ref_training_loss(means: list[float], loss: str) -> float:
    """SPEC 4, from the MEAN of each suffix's token NLL."""
    return {"good": lambda: means[0], "bad": lambda: -means[0], "balance": lambda: abs(means[0] - means[1]),
            "good-v-bad": lambda: means[0] - means[1]}[loss]()


class Data:
    """The user task's records, tokenized by the reference."""

    def __init__(self, tok, folder: Path) -> None:
        def lines(name: str) -> list[dict]:
            return [json.loads(line) for line in (folder / name).read_text().splitlines()]

        self.canonical = [ref_example(tok, r) for r in lines("canonical.jsonl")]
        self.evaluation = [ref_example(tok, r) for r in lines("evaluation.jsonl")]
        self.targeted = [ref_text(tok, r["text"]) for r in lines("targeted.jsonl")]
        self.hard = [ref_text(tok, r["text"]) if "text" in r else ref_example(tok, r)[0] for r in lines("hard.jsonl")]
        self.hard_is_text = ["text" in r for r in lines("hard.jsonl")]
        general = (SHARED_DATA / "general" / "degradation.jsonl").read_text().splitlines()[:N_GENERAL]
        self.general = [ref_text(tok, json.loads(line)["text"]) for line in general]


def ref_scores(model, data: Data, loss: str) -> list[float]:
    return [ref_score([sum(reference_sequence_nll(model, ids, start)) for ids, start in seqs], loss)
            for seqs in data.evaluation]


def token_mean(model, texts: list[tuple[list[int], int]]) -> float:
    total, tokens = 0.0, 0
    for ids, start in texts:
        nll = reference_sequence_nll(model, ids, start)
        total += sum(nll)
        tokens += len(nll)
    return total / tokens


def ref_metrics(model, data: Data, loss: str, threshold: float) -> dict:
    """SPEC 5 numbers of one model state, and the practitioner's (issue 14): reliability (success and mean score on
    the canonical examples themselves), the evaluation set's mean score, and the per-example hard-negative values
    that locality compares with p0's."""
    scores = ref_scores(model, data, loss)
    failed = [not (math.isfinite(s) and s <= threshold) for s in scores]
    hard = []
    for (ids, start), is_text in zip(data.hard, data.hard_is_text, strict=True):
        nll = reference_sequence_nll(model, ids, start)
        hard.append(sum(nll) / len(nll) if is_text else sum(nll))
    canonical = [ref_score([sum(reference_sequence_nll(model, ids, start)) for ids, start in seqs], loss)
                 for seqs in data.canonical]
    canonical_failed = [not (math.isfinite(s) and s <= threshold) for s in canonical]
    return {"scores": scores, "failed": failed, "success_rate": 1.0 - sum(failed) / len(failed),
            "general_nll": token_mean(model, data.general), "targeted_nll": token_mean(model, data.targeted),
            "hard_negative_nll": sum(hard) / len(hard), "hard": hard,
            "reliability": 1.0 - sum(canonical_failed) / len(canonical_failed),
            "reliability_mean_score": sum(canonical) / len(canonical),
            "generalization_mean_score": sum(scores) / len(scores)}


def ref_locality(p0_hard: list[float], hard: list[float]) -> float:
    """The fraction of hard negatives whose value rose by at most ln 2 nats from p0's (finite values only)."""
    kept = [math.isfinite(a) and math.isfinite(b) and b - a <= math.log(2) for a, b in zip(p0_hard, hard, strict=True)]
    return sum(kept) / len(kept)


def ref_chosen(general: list[float], eps: float) -> int:
    """SPEC 6: the last epoch whose general NLL < (1 + eps) x epoch 0's; epoch 0 always qualifies."""
    chosen = 0
    for epoch, nll in enumerate(general):
        if math.isfinite(nll) and nll < (1 + eps) * general[0]:
            chosen = epoch
    return chosen


class Measure(L.Callback):
    """Runs after the DegradationBudget at each of its evaluation points, and around every training batch."""

    def __init__(self, data: Data, loss: str, threshold: float) -> None:
        self.data, self.loss, self.threshold = data, loss, threshold
        self.reference: list[dict] = []
        self.package: list[dict] = []
        self.losses: list[tuple[float, float]] = []
        self._pending: float | None = None

    def _measure(self, trainer, module) -> None:
        was = module.model.training
        module.model.eval()
        self.reference.append(ref_metrics(module.model, self.data, self.loss, self.threshold))
        module.model.train(was)
        self.package.append(evaluate(module, trainer.datamodule))

    def on_fit_start(self, trainer, module) -> None:
        self._measure(trainer, module)

    def on_train_epoch_end(self, trainer, module) -> None:
        self._measure(trainer, module)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # the weights the training step will see (it runs the model in eval mode; no dropout is active)
        was = module.model.training
        module.model.eval()
        values = []
        for i in batch["example_index"].tolist():
            means = []
            for ids, start in self.data.canonical[i]:
                nll = reference_sequence_nll(module.model, ids, start)
                means.append(sum(nll) / len(nll))
            values.append(ref_training_loss(means, self.loss))
        module.model.train(was)
        self._pending = sum(values) / len(values)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append((float(trainer.callback_metrics["train/task_loss"]), self._pending))


def make_task(folder: Path, task: str, loss: str, hard_format: str, threshold: float) -> Path:
    canonical, evaluation, targeted, hard = FILES[task]

    def head(stem: str, n: int) -> list[str]:
        return (SHARED_DATA / task / "split" / f"{stem}-val.jsonl").read_text().splitlines()[:n]

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "canonical.jsonl").write_text("\n".join(head(canonical, N_CANONICAL)) + "\n")
    (folder / "evaluation.jsonl").write_text("\n".join(head(evaluation, N_EVAL)) + "\n")
    (folder / "targeted.jsonl").write_text("\n".join(head(targeted, N_EVAL)) + "\n")
    hard_lines = head(hard, N_EVAL)
    if hard_format == "text":  # the same lines as whole texts: scored by their token-mean NLL
        hard_lines = [json.dumps({"text": (r := json.loads(line))["prefix"] + r["suffix"]}) for line in hard_lines]
    (folder / "hard.jsonl").write_text("\n".join(hard_lines) + "\n")
    (folder / "task.yaml").write_text(
        f"name: {task}_small\nloss: {loss}\nthreshold: {threshold!r}\ncanonical: canonical.jsonl\n"
        "evaluation: evaluation.jsonl\ntargeted: targeted.jsonl\nhard_negatives: hard.jsonl\n")
    return folder / "task.yaml"


def make_module(method: str, model: str, lr: float):
    base = ModelConfig(name=model, precision="fp32")
    optimizer = OptimizerConfig(lr=lr) if method != "memit" else None  # MEMIT has no optimizer (its lr is 0 here)
    if method == "lora":
        return LoRAEditor(base, lora=LoRAConfig(rank=4, layer_fraction=0.5), optimizer=optimizer)
    if method == "full":
        return FullEditor(base, optimizer=optimizer)
    if method == "senses":
        return SensesEditor(base, senses=SensesConfig(senses_per_example=6, selection_lambda=100.0),
                             optimizer=optimizer)
    return MEMITEditor(base, memit=MEMITConfig(layers=[1, 2], steps=5, covariance_samples=300, context_templates=1,
                                               context_template_length=4))


@pytest.mark.parametrize(("method", "model", "task", "loss", "hard_format", "lr"), CASES)
def test_reported_numbers_match_the_spec_reference(tmp_path, monkeypatch, data_root, method, model, task, loss,
                                                   hard_format, lr) -> None:
    monkeypatch.setenv("EDITING_CACHE", str(tmp_path / "cache"))
    L.seed_everything(0)
    module = make_module(method, model, lr)
    tok = module.tokenizer
    # a threshold between the two middle p0 scores: half the examples succeed before the edit
    make_task(tmp_path / "task", task, loss, hard_format, 0.0)
    module.model.eval()
    p0 = sorted(ref_scores(module.model, Data(tok, tmp_path / "task"), loss))
    threshold = (p0[N_EVAL // 2 - 1] + p0[N_EVAL // 2]) / 2
    yaml_path = make_task(tmp_path / "task", task, loss, hard_format, threshold)
    data = Data(tok, tmp_path / "task")

    dm = TaskDataModule(task=str(yaml_path), eval_limit=N_EVAL, general_limit=N_GENERAL, batch_size=2)
    measure = Measure(data, loss, threshold)
    budget = DegradationBudget(balls=list(BALLS), output_dir=str(tmp_path / "run"))
    L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
              use_distributed_sampler=False, num_sanity_val_steps=0, enable_checkpointing=False,
              default_root_dir=str(tmp_path), callbacks=[budget, measure]).fit(module, dm)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    epochs = results["epochs"]
    assert len(epochs) == len(measure.reference) == (2 if method == "memit" else 4)

    for epoch, (ref, got, record) in enumerate(zip(measure.reference, measure.package, epochs, strict=True)):
        assert record["epoch"] == epoch
        # per-example scores and failures (evaluate()); success rate (evaluate() and results.json)
        scores = [p["score"] for p in got["per_example"]]
        assert scores == pytest.approx(ref["scores"], abs=2e-5)
        assert [p["failed"] for p in got["per_example"]] == ref["failed"]
        assert got["counts"]["evaluation_failed"] == sum(ref["failed"])
        assert got["success_rate"] == record["success_rate"] == pytest.approx(ref["success_rate"], abs=1e-12)
        for name in ("general_nll", "targeted_nll", "hard_negative_nll"):
            assert record[name] == pytest.approx(ref[name], rel=2e-7), name
        degradation = ref["general_nll"] / measure.reference[0]["general_nll"] - 1
        assert record["degradation"] == pytest.approx(degradation, abs=2e-7)
        # the practitioner's metrics (issue 14 item 3)
        assert record["reliability"] == pytest.approx(ref["reliability"], abs=1e-12)
        for name in ("reliability_mean_score", "generalization_mean_score"):
            assert record[name] == pytest.approx(ref[name], rel=2e-6, abs=2e-5), name
        assert record["locality"] == ref_locality(measure.reference[0]["hard"], ref["hard"])

    # the model changed, and the success rate before the edit is the one the threshold was placed for
    assert measure.reference[-1]["general_nll"] != measure.reference[0]["general_nll"]
    assert measure.reference[0]["success_rate"] == 0.5

    # SPEC 4: the task loss of every training step
    if method == "memit":
        assert measure.losses == []
    else:
        assert len(measure.losses) == 3 * N_CANONICAL // 2
        for got_loss, ref_loss in measure.losses:
            assert got_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)

    # SPEC 6: per ball, the reported epoch and the change in percentage points
    general = [r["general_nll"] for r in measure.reference]
    success = [r["success_rate"] for r in measure.reference]
    assert list(results["balls"]) == ["1e-02", "1e-03", "1e-04", "1e-05"]
    for eps, (key, info) in zip(BALLS, results["balls"].items(), strict=True):
        chosen = ref_chosen(general, eps)
        assert info["epoch"] == chosen, key
        assert info["success_change_pp"] == pytest.approx(100 * (success[chosen] - success[0]), abs=1e-9), key
        assert info["metrics"]["general_nll"] == pytest.approx(general[chosen], rel=2e-7), key
        # the practitioner's metrics of the ball's epoch, against the reference of that epoch
        ref = measure.reference[chosen]
        assert info["metrics"]["reliability"] == pytest.approx(ref["reliability"], abs=1e-12), key
        for name in ("reliability_mean_score", "generalization_mean_score"):
            assert info["metrics"][name] == pytest.approx(ref[name], rel=2e-6, abs=2e-5), (key, name)
        assert info["metrics"]["locality"] == ref_locality(measure.reference[0]["hard"], ref["hard"]), key

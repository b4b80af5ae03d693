"""The editing base LightningModule: a frozen base model, evaluated on a task's sets (SPEC section 5).

Editing methods subclass it and add trainable deltas; evaluation is shared, so every method is measured the same
way. ``evaluate_batch``/``evaluation_summary`` are the small interface callbacks use.
"""

from __future__ import annotations

import sys
from dataclasses import asdict

import lightning as L
import torch
from torch import nn
from tqdm.auto import tqdm

from editing.evaluation.metrics import ExampleMeanNLL, ExampleScores, SuccessRate, TokenMeanNLL
from editing.evaluation.scorer import example_nll, sequence_nll
from editing.losses import example_score
from editing.models.loading import LoadedModel, ModelConfig, load_model
from editing.tasks import TaskSpec

METRIC_NAMES = ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll")


class EditingModule(L.LightningModule):
    """A language model under evaluation (and, in subclasses, under editing).

    Args:
        base: which model to load and at what precision.
    """

    def __init__(self, base: ModelConfig | None = None) -> None:
        super().__init__()
        self.base_config = base or ModelConfig()
        self.save_hyperparameters({"base": asdict(self.base_config)})
        self.loaded: LoadedModel = load_model(self.base_config)
        self.model = self.loaded.model
        self.task: TaskSpec | None = None
        self.eval_metrics = nn.ModuleDict()

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.loaded.tokenizer

    @property
    def max_length(self) -> int:
        """The model's context length."""
        return self.loaded.max_length

    @property
    def identity(self) -> dict:
        """Name, source and weight fingerprint of the base model."""
        return self.loaded.identity

    def bind_task(self, task: TaskSpec) -> None:
        """Set the task whose loss and threshold scoring uses, and fresh metrics for it."""
        self.task = task
        device = next(self.model.parameters()).device
        self.eval_metrics = nn.ModuleDict({
            "success_rate": SuccessRate(task.threshold),
            "general_nll": TokenMeanNLL(),
            "targeted_nll": TokenMeanNLL(),
            "hard_negative_nll": ExampleMeanNLL(),
            "scores": ExampleScores(),
        }).to(device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and self.task is None:
            self.bind_task(datamodule.task)

    # evaluation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_batch(self, batch: dict) -> None:
        """Score one evaluation batch and update the metric of its role."""
        role = batch["role"]
        m = self.eval_metrics
        if role == "evaluation":
            sums, _ = example_nll(self.model, batch)
            scores = example_score(sums, self.task.loss)
            m["success_rate"].update(scores)
            m["scores"].update(batch["example_index"], scores)
        elif role in ("general", "targeted"):
            sums, counts = sequence_nll(self.model, batch)
            m[f"{role}_nll"].update(sums, counts)
        elif role == "hard_negatives":
            sums, counts = example_nll(self.model, batch)
            # suffix lines: the suffix NLL sum; text lines: the text's token-mean NLL (SPEC section 5)
            values = torch.where(batch["is_text"], sums[:, 0] / counts[:, 0].clamp(min=1), sums[:, 0])
            m["hard_negative_nll"].update(values)
        else:
            raise ValueError(f"unknown evaluation role {role!r}")

    def evaluation_summary(self, reset: bool = True) -> dict:
        """Computed metrics (synchronised across processes) and per-example scores; resets the metrics."""
        m = self.eval_metrics
        summary: dict = {}
        for name in METRIC_NAMES:
            metric = m[name]
            summary[name] = float(metric.compute()) if metric.update_count > 0 else None
        index, score = m["scores"].compute() if m["scores"].update_count > 0 else (torch.zeros(0), torch.zeros(0))
        summary["counts"] = {
            "evaluation": int(m["success_rate"].total),
            "evaluation_failed": int(m["success_rate"].failed),
            "general_tokens": int(m["general_nll"].tokens),
            "targeted_tokens": int(m["targeted_nll"].tokens),
            "hard_negatives": int(m["hard_negative_nll"].count),
        }
        summary["per_example"] = [
            {"index": int(i), "score": float(s), "failed": bool(s > self.task.threshold)}
            for i, s in zip(index.tolist(), score.tolist())
        ]
        if reset:
            for metric in m.values():
                metric.reset()
        return summary

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(batch)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.evaluate_batch(batch)

    def _log_summary(self, stage: str) -> None:
        self.last_evaluation = self.evaluation_summary()
        for name in METRIC_NAMES:
            value = self.last_evaluation[name]
            if value is not None:
                self.log(f"{stage}/{name}", value, rank_zero_only=True, add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val")

    def on_test_epoch_end(self) -> None:
        self._log_summary("test")


def evaluate(module: EditingModule, datamodule, roles: list[str] | None = None, progress: bool = False) -> dict:
    """Evaluate ``module`` on ``datamodule``'s evaluation sets without a Trainer (one process).

    Args:
        module: the model under evaluation.
        datamodule: a ``TaskDataModule`` (attached to the module's tokenizer if it is not yet).
        roles: which evaluation roles to run (default: all the task has).
        progress: show a progress bar per role.

    Returns:
        The evaluation summary (see ``EditingModule.evaluation_summary``).
    """
    if datamodule.tokenizer is None:
        datamodule.attach(module.tokenizer, module.max_length)
    if module.task is None or module.task.name != datamodule.task.name:
        module.bind_task(datamodule.task)
    device = next(module.model.parameters()).device
    for role in roles or datamodule.eval_roles():
        loader = datamodule.eval_dataloader(role)
        if progress:
            loader = tqdm(loader, desc=f"{datamodule.task.name}/{role}", leave=False, file=sys.stderr)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            module.evaluate_batch(batch)
    return module.evaluation_summary()

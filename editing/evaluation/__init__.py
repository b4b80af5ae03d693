"""Evaluation: the batched scorer, the one-at-a-time reference loop, torchmetrics metrics, and the evaluation loop
(``Evaluator``, ``evaluate``) that every measurement goes through."""

from editing.evaluation.evaluator import METRIC_NAMES, Evaluable, Evaluator, evaluate

__all__ = ["METRIC_NAMES", "Evaluable", "Evaluator", "evaluate"]

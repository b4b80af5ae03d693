"""Lightning callbacks of canonical-editing."""

from callbacks.evaluation_report import EvaluationReport

__all__ = ["EvaluationReport"]

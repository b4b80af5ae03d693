"""Lightning callbacks of canonical-editing."""

from callbacks.evaluation_writer import EvaluationWriter

__all__ = ["EvaluationWriter"]

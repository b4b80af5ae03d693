"""Markdown tables: every table the commands print or write is built here, on one grid builder.

``markdown_table`` draws the grid; the functions below it lay out each command's table: the metrics of
``evaluate``/``apply``, the balls of a fit and of the ensemble, a sweep's best configurations and its selection.
The report's success and hard-negative tables (``editing.protocol.report``) use the same grid.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from editing.core.types import Metric
from editing.rules.budget import success_change_pp
from editing.runs.records import Metrics, RunRecord, SelectedBall, Selection


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: a header row, the ``|---|`` rule and one line per row (cells as given, through ``str``).

    Args:
        headers: the column names.
        rows: the rows, each as many cells as there are headers.

    Returns:
        The table, lines joined by newlines (no trailing newline).
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        row = list(row)
        if len(row) != len(headers):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(headers)} columns: {row!r}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or ``-`` when it is missing."""
    return "-" if value is None else format(value, spec)


def value_text(value: Any) -> str:
    """A setting's value as written on a command line: ``true``/``false``, floats exactly (``repr``), lists and
    mappings as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def short_config(params: Mapping[str, Any]) -> str:
    """``rank=8, lr=0.003``: the last part of each key, floats to 3 significant digits."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}=" + (f"{v:.3g}" if isinstance(v, float) else value_text(v))
                     for k, v in params.items())


# ----------------------------------------------------------------------------------------------------------------
# the commands' tables
# ----------------------------------------------------------------------------------------------------------------
METRICS_HEADERS = ("task", "success rate", "general NLL", "targeted NLL", "hard-neg NLL", "examples")


def metrics_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """One model's metrics per task (``editing evaluate``, ``editing apply``).

    Args:
        rows: per task ``{"task", <the four Metric values>, "examples"}``.
    """
    return markdown_table(METRICS_HEADERS, (
        (r["task"], number(r[Metric.SUCCESS_RATE], ".3f"), number(r[Metric.GENERAL_NLL], ".5f"),
         number(r[Metric.TARGETED_NLL], ".4f"), number(r[Metric.HARD_NEGATIVE_NLL], ".4f"), r["examples"])
        for r in rows))


def balls_table(run: RunRecord) -> str:
    """A fit's outcome per ball: the epoch chosen, success before/after, change (pp) and the general NLL's factor."""
    initial = run.initial.metrics
    return markdown_table(
        ("ball", "epoch", "success before", "success after", "change (pp)", "general NLL x"),
        ((key, b.epoch, f"{initial.success_rate:.3f}", f"{b.metrics.success_rate:.3f}",
          f"{b.success_change_pp:+.1f}", f"{1 + b.metrics.degradation:.6f}") for key, b in run.balls.items()))


def ensemble_table(initial: Metrics, balls: Mapping[str, tuple[float, Metrics]]) -> str:
    """The ensemble's outcome per ball: the beta chosen, success before/after, change (pp) and the general NLL's
    factor relative to the large model alone.

    Args:
        initial: the large model's metrics (beta 0).
        balls: ball key -> (beta, the ensemble's metrics at that beta, with their ``degradation``).
    """
    return markdown_table(
        ("ball", "beta", "success before", "success after", "change (pp)", "general NLL x"),
        ((key, f"{beta:.1f}", f"{initial.success_rate:.3f}", f"{m.success_rate:.3f}",
          f"{success_change_pp(initial.success_rate, m.success_rate):+.1f}", f"{1 + m.degradation:.6f}")
         for key, (beta, m) in balls.items()))


def best_table(best: Mapping[str, SelectedBall]) -> str:
    """A running sweep's best complete trial per ball (``editing sweep-status``)."""
    return markdown_table(
        ("ball", "best trial", "success change (pp)", "epoch", "degradation", "configuration"),
        ((key, b.trial, f"{b.success_change_pp:+.1f}", b.epoch, f"{b.degradation:.2e}", short_config(b.params))
         for key, b in best.items()))


def selection_table(selection: Selection) -> str:
    """A study's selection per ball (``editing select``), under a line naming the study."""
    table = markdown_table(
        ("ball", "trial", "epoch", "success change (pp)", "degradation", "configuration"),
        ((key, b.trial, b.epoch, f"{b.success_change_pp:+.1f}", f"{b.degradation:.2e}", short_config(b.params))
         for key, b in selection.balls.items()))
    return (f"{selection.study}: best of {selection.trials} complete trials per ball (validation pair)\n" + table)


__all__ = ["balls_table", "best_table", "ensemble_table", "markdown_table", "metrics_table", "number",
           "selection_table", "short_config", "value_text"]

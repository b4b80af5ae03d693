"""The paper's protocol at scale: ``editing sweep``, ``sweep-status``, ``select``, ``test-runs`` (the functions of
``editing.sweep``, whose signatures are the commands' options) and ``editing report``."""

from __future__ import annotations

from editing.sweep import run_sweep as sweep
from editing.sweep import select, sweep_status, test_runs

__all__ = ["report", "select", "sweep", "sweep_status", "test_runs"]


def report(root: list[str] | str | None = None, output_dir: str = "runs/report", digits: int = 1,
           overwrite: bool = False) -> dict[str, str]:
    """The paper's tables (Markdown and LaTeX) and plots (PNG) from the test runs of one or more sweep roots.

    Args:
        root: a sweep root or a list of them (folders of ``<study>/selection.json``; default ``runs/sweeps``), or
            study folders.
        output_dir: where ``report.md``, ``tables.tex``, ``report.json`` and the PNG files go.
        digits: decimals of the table cells.
        overwrite: replace an earlier report in ``output_dir``.

    Returns:
        Paths of the files written.
    """
    from editing.report import make_report

    return make_report(root=root, output=output_dir, digits=digits, overwrite=overwrite)

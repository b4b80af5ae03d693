"""The paper's protocol at scale: ``editing sweep``, ``sweep-status``, ``select``, ``test-runs`` (the functions of
``editing.protocol.sweep``, whose signatures are the commands' options) and ``editing report``."""

from __future__ import annotations

from editing.protocol.report import make_report as report
from editing.protocol.sweep import run_sweep as sweep
from editing.protocol.sweep import select, sweep_status, test_runs

__all__ = ["report", "select", "sweep", "sweep_status", "test_runs"]

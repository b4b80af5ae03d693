"""The paper's protocol at scale: ``editing sweep``, ``sweep-status``, ``select``, ``test-runs`` (the functions of
``editing.protocol.{sweep,select,test_runs}``, whose signatures are the commands' options) and ``editing report``."""

from __future__ import annotations

from editing.protocol.report import make_report as report
from editing.protocol.select import select
from editing.protocol.sweep import run_sweep as sweep
from editing.protocol.sweep import sweep_status
from editing.protocol.test_runs import test_runs

__all__ = ["report", "select", "sweep", "sweep_status", "test_runs"]

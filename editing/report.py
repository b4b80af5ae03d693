"""Tables and plots of the protocol's test runs (filled in below)."""

from __future__ import annotations


def make_report(root: str = "runs/sweeps", output: str = "runs/report") -> None:
    """Tables and plots from the test runs."""
    raise NotImplementedError

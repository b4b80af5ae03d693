"""MEMIT: closed-form edits of the MLP down projections, with cached covariance statistics (SPEC section 10)."""

from editing.methods.memit.config import SWEEP_SPACE, MEMITConfig
from editing.methods.memit.module import MEMITEditor

__all__ = ["SWEEP_SPACE", "MEMITConfig", "MEMITEditor"]

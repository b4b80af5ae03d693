"""``editing auto``: search hyperparameters for the best edit inside a ball within a budget (the function's
signature is the command's options; see ``editing.protocol.auto``)."""

from __future__ import annotations

from editing.protocol.auto import auto_edit as auto

__all__ = ["auto"]

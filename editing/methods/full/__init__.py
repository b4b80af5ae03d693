"""Full finetuning: every weight is trainable; p0 is a frozen copy."""

from editing.methods.full.module import FullFinetune

__all__ = ["FullFinetune"]

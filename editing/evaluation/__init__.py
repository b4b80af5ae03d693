"""Evaluation: the batched scorer, the one-at-a-time reference loop, and torchmetrics metrics."""

"""AlphaEdit settings (SPEC section 12). The sweep ranges are written once, in
``lightning_configs/sweeps/alphaedit.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editing.methods.memit.config import TargetSettings, check_layer_list


@dataclass
class AlphaEditConfig(TargetSettings):
    """AlphaEdit: MEMIT's keys, targets and residuals, with each layer's update confined to the null space of the
    general corpus's keys (SPEC section 12). The requests, targets and statistics settings are MEMIT's
    (``TargetSettings``).

    Sweep ranges: ``lightning_configs/sweeps/alphaedit.yaml`` (SPEC section 12).
    """

    section: ClassVar[str] = "alphaedit"
    """The settings' group under ``model.init_args`` (messages name ``alphaedit.<setting>``)."""

    layers: list[int] | None = None
    """Edited layers, 0-based and ascending (default, None: MEMIT's default layers of the model)."""
    threshold: float = 0.02
    """The null space: the eigenvectors of C = E[k k^T] whose eigenvalues are below this (swept)."""
    l2: float = 10.0
    """L2: the weight of the identity in (P (K K^T + Kp Kp^T) + L2 I) (swept)."""
    clamp_norm_factor: float = 0.75
    """The residual change delta at the last edited layer is clamped to this times the hidden state's norm (swept,
    as MEMIT's)."""
    steps: int = 25
    """Adam steps optimizing each target vector."""
    weight_decay: float = 0.5
    """Weight of the penalty |delta| / |h| on the residual change (v_weight_decay)."""
    request_batch_size: int = 32
    """Requests whose target vectors are optimized together in one batch."""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the setting at fault."""
        self.check([
            ("threshold", math.isfinite(self.threshold) and self.threshold > 0, "a positive number"),
            ("l2", math.isfinite(self.l2) and self.l2 > 0, "a positive number (the solve needs L2 I)"),
            ("clamp_norm_factor", self.clamp_norm_factor > 0, "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("request_batch_size", self.request_batch_size >= 1, "at least 1"),
        ])
        check_layer_list(self)

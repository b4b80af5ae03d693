"""AlphaEdit settings (SPEC section 12). The sweep ranges are written once, in
``lightning_configs/sweeps/alphaedit.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editing.core.errors import ConfigError
from editing.methods.memit.config import Supervision, check_ranges, check_supervision


@dataclass
class AlphaEditConfig:
    """AlphaEdit: MEMIT's keys, targets and residuals, with each layer's update confined to the null space of the
    general corpus's keys (SPEC section 12).

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
    kl_factor: float = 0.0625
    """Weight of KL(p0 || p) at the subject's last token of an "<subject> is a" prompt while optimizing the
    targets."""
    steps: int = 25
    """Adam steps optimizing each target vector."""
    lr: float = 0.5
    """Adam learning rate of the target optimization."""
    weight_decay: float = 0.5
    """Weight of the penalty |delta| / |h| on the residual change (v_weight_decay)."""
    supervision: Supervision = "standard"
    """``standard``: the subject is the whole prefix; ``oracle``: an entity span of the prefix (as MEMIT's)."""
    oracle_field: str | None = None
    """Oracle supervision: the field of each canonical line holding the subject (as ``memit.oracle_field``)."""
    oracle_pattern: str | None = None
    """Oracle supervision: a regular expression whose first group is the subject (as ``memit.oracle_pattern``)."""
    covariance_samples: int = 100000
    """Tokens of R over which C is estimated (MEMIT's cached statistics)."""
    covariance_batch_size: int = 16
    """Texts of R per forward pass while estimating C."""
    context_templates: int = 5
    """Model-generated prefixes the keys are averaged over, besides the bare prompt (0: the bare prompt only)."""
    context_template_length: int = 10
    """Tokens per generated prefix."""
    request_batch_size: int = 32
    """Requests whose target vectors are optimized together in one batch."""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the setting at fault."""
        check_ranges(self, [
            ("threshold", math.isfinite(self.threshold) and self.threshold > 0, "a positive number"),
            ("l2", math.isfinite(self.l2) and self.l2 > 0, "a positive number (the solve needs L2 I)"),
            ("clamp_norm_factor", self.clamp_norm_factor > 0, "a positive number"),
            ("kl_factor", self.kl_factor >= 0, "a number >= 0"),
            ("steps", self.steps >= 1, "at least 1"),
            ("lr", self.lr > 0, "a positive number"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("covariance_samples", self.covariance_samples >= 1, "at least 1 token"),
            ("covariance_batch_size", self.covariance_batch_size >= 1, "at least 1"),
            ("context_templates", self.context_templates >= 0, "0 or more"),
            ("context_template_length", self.context_template_length >= 1, "at least 1"),
            ("request_batch_size", self.request_batch_size >= 1, "at least 1"),
        ])
        check_supervision(self)
        if self.layers is not None and (not self.layers or sorted(set(self.layers)) != list(self.layers)):
            raise ConfigError(f"alphaedit.layers={self.layers!r} must be a non-empty ascending list of distinct "
                              "layers")

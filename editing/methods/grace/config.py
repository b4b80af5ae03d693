"""GRACE settings (SPEC section 13)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from editing.core.errors import ConfigError


@dataclass
class GRACEConfig:
    """GRACE: a codebook of (key, value, eps, label) entries replacing one module's output (SPEC section 13)."""

    layer: int | None = None
    """Wrapped layer, 0-based (its MLP down projection); None: a late layer of the model."""
    init_eps: float = 1.0
    """Radius of a new entry (Euclidean, in the module input's space)."""
    span: Literal["position", "following"] = "position"
    """``position``: replace the output at each matching position; ``following``: also at every later position."""
    value_init: Literal["cold", "warm"] = "cold"
    """A new entry's value: ``cold`` random, ``warm`` the module's output at the query."""
    lr: float = 1.0
    """Learning rate of the value's gradient descent."""
    steps: int = 200
    """Gradient steps per edited entry."""

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting and the fix."""
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"grace.layer must be >= 0 (got {self.layer}); set a 0-based index or leave it unset")
        if not self.init_eps > 0:
            raise ConfigError(f"grace.init_eps must be > 0 (got {self.init_eps}); set a positive radius, e.g. 1.0")
        if self.span not in ("position", "following"):
            raise ConfigError(f"grace.span must be 'position' or 'following' (got {self.span!r})")
        if self.value_init not in ("cold", "warm"):
            raise ConfigError(f"grace.value_init must be 'cold' or 'warm' (got {self.value_init!r})")
        if not self.lr > 0:
            raise ConfigError(f"grace.lr must be > 0 (got {self.lr}); set a positive learning rate, e.g. 1.0")
        if self.steps < 1:
            raise ConfigError(f"grace.steps must be >= 1 (got {self.steps}); set a positive step count, e.g. 200")

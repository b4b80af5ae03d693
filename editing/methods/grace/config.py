"""GRACE settings (SPEC section 13). The sweep ranges are written once, in ``lightning_configs/sweeps/grace.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from editing.core.errors import ConfigError

DEFAULT_FRACTION = 0.9
"""The wrapped layer when none is set: floor(0.9 x layers), a late layer (GPT-J's 28 layers give the reference's 25)."""


@dataclass
class GRACEConfig:
    """GRACE: a codebook of (key, value, eps, label) entries replacing one module's output (SPEC section 13).

    Sweep ranges: ``lightning_configs/sweeps/grace.yaml`` (SPEC section 13).
    """

    layer: int | None = None
    """Wrapped layer, 0-based (its MLP down projection); None: ``layer_fraction`` if set, else floor(0.9 x layers)."""
    layer_fraction: float | None = None
    """The wrapped layer as a fraction f of the depth: layer floor(f x layers), so that one search space fits every
    model (the sweep draws f over the last third). Set ``layer`` or this."""
    init_eps: float = 1.0
    """Radius of a new entry (Euclidean, in the module input's space)."""
    init_eps_factor: float | None = None
    """When set, a new entry's radius is this factor times the median nearest-neighbour distance between the
    canonical examples' queries (what the sweep draws), and ``init_eps`` is not used."""
    span: Literal["position", "following"] = "position"
    """``position``: replace the output at each matching position; ``following``: also at every later position."""
    value_init: Literal["cold", "warm"] = "cold"
    """A new entry's value: ``cold`` random (standard normal), ``warm`` the module's output at the query."""
    seed: int = 0
    """Seed of the cold values: the i-th canonical example's draw is the i-th standard-normal vector of a generator
    seeded with it (its own generator, so caches and data loading, which use the global one, cannot change it)."""
    lr: float = 1.0
    """Learning rate of the value's gradient descent (plain steps v <- v - lr * grad)."""
    steps: int = 200
    """Gradient steps per edited entry."""

    def validate(self) -> None:
        """Raise ConfigError naming the bad setting and the fix."""
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"grace.layer must be >= 0 (got {self.layer}); set a 0-based index or leave it unset")
        if self.layer_fraction is not None and not (math.isfinite(self.layer_fraction)
                                                    and 0 <= self.layer_fraction < 1):
            raise ConfigError(f"grace.layer_fraction must be a fraction in [0, 1) (got {self.layer_fraction})")
        if self.layer is not None and self.layer_fraction is not None:
            raise ConfigError(f"set only one of grace.layer={self.layer} and grace.layer_fraction="
                              f"{self.layer_fraction}")
        if not (math.isfinite(self.init_eps) and self.init_eps > 0):
            raise ConfigError(f"grace.init_eps must be > 0 (got {self.init_eps}); set a positive radius, e.g. 1.0")
        if self.init_eps_factor is not None and not (math.isfinite(self.init_eps_factor) and self.init_eps_factor > 0):
            raise ConfigError(f"grace.init_eps_factor must be > 0 (got {self.init_eps_factor}); set a positive "
                              "factor, e.g. 1.0, or leave it unset to use grace.init_eps")
        if self.span not in ("position", "following"):
            raise ConfigError(f"grace.span must be 'position' or 'following' (got {self.span!r})")
        if self.value_init not in ("cold", "warm"):
            raise ConfigError(f"grace.value_init must be 'cold' or 'warm' (got {self.value_init!r})")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"grace.lr must be > 0 (got {self.lr}); set a positive learning rate, e.g. 1.0")
        if self.steps < 1:
            raise ConfigError(f"grace.steps must be >= 1 (got {self.steps}); set a positive step count, e.g. 200")


def resolve_layer(cfg: GRACEConfig, total: int) -> int:
    """The wrapped layer: ``cfg.layer``, else floor(``layer_fraction`` x total), else floor(0.9 x total).

    Raises:
        ConfigError: ``cfg.layer`` is not one of the model's ``total`` layers.
    """
    if cfg.layer is not None:
        if cfg.layer >= total:
            raise ConfigError(f"model.init_args.grace.layer={cfg.layer}, but the model has {total} layers "
                              f"(0..{total - 1}): give a layer below {total}, or leave it out for a late layer")
        return cfg.layer
    fraction = cfg.layer_fraction if cfg.layer_fraction is not None else DEFAULT_FRACTION
    return min(total - 1, math.floor(fraction * total))

"""ROME settings (SPEC section 11). The sweep ranges are written once, in ``lightning_configs/sweeps/rome.yaml``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from editing.core.errors import ConfigError
from editing.methods.memit.config import TargetSettings, default_layers

# The edited layer per (model type, number of layers) where the reference chose one (GPT-2 XL: 17, GPT-J: 5);
# otherwise the last of MEMIT's default layers (for GPT-2 XL that is the same 17).
DEFAULT_LAYER: dict[tuple[str, int], int] = {("gpt2", 48): 17, ("gptj", 28): 5}


@dataclass
class ROMEConfig(TargetSettings):
    """ROME: one rank-one closed-form update of one layer's MLP down projection per request, requests one after
    another (SPEC section 11). The requests, values and statistics settings are MEMIT's (``TargetSettings``).

    Sweep ranges: ``lightning_configs/sweeps/rome.yaml`` (SPEC section 11).
    """

    section: ClassVar[str] = "rome"
    """The settings' group under ``model.init_args`` (messages name ``rome.<setting>``)."""

    layer: int | None = None
    """The edited layer, 0-based (default, None: ``layer_fraction`` if set, else per model: ``DEFAULT_LAYER``, else
    the last of MEMIT's default layers)."""
    layer_fraction: float | None = None
    """The edited layer as a fraction f of the depth: layer floor(f * layers), so that one search space fits every
    model (the sweep draws f from U(1/3, 2/3): a uniform layer of the middle third). Set ``layer`` or this."""
    clamp_norm_factor: float = 4.0
    """The change delta of the value is clamped to this times the norm of the unedited value v0
    (swept, lightning_configs/sweeps/rome.yaml)."""
    v_weight_decay: float = 0.5
    """Weight of the penalty |delta| / |v0|^2 on the value's change (the reference divides by the square)."""
    use_statistics: bool = True
    """u = C^-1 k* with C = E[k k^T] over the general set R (SPEC section 10's statistics); false: C = I."""

    @property
    def weight_decay(self) -> float:
        """``v_weight_decay`` under the name the shared target optimization (``memit.compute``) reads."""
        return self.v_weight_decay

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the setting at fault."""
        self.check([
            ("clamp_norm_factor", self.clamp_norm_factor > 0, "a positive number"),
            ("v_weight_decay", self.v_weight_decay >= 0, "a number >= 0"),
            ("layer", self.layer is None or self.layer >= 0, "a layer index >= 0"),
            ("layer_fraction", self.layer_fraction is None or (math.isfinite(self.layer_fraction)
                                                               and 0 <= self.layer_fraction < 1),
             "a fraction in [0, 1)"),
        ])
        if self.layer is not None and self.layer_fraction is not None:
            raise ConfigError(f"set only one of rome.layer={self.layer} and rome.layer_fraction="
                              f"{self.layer_fraction}")


def resolve_layer(cfg: ROMEConfig, model_type: str | None, total: int) -> int:
    """The layer to edit: ``cfg.layer``, else ``floor(layer_fraction * total)``, else the model's default.

    Raises:
        ConfigError: ``cfg.layer`` is not one of the model's ``total`` layers.
    """
    if cfg.layer is not None:
        if cfg.layer >= total:
            raise ConfigError(f"model.init_args.rome.layer={cfg.layer}, but the model ({model_type or 'this model'}) "
                              f"has {total} layers (0..{total - 1}): give a layer below {total}, or leave it out for "
                              "the model's default")
        return cfg.layer
    if cfg.layer_fraction is not None:
        return min(total - 1, math.floor(cfg.layer_fraction * total))
    return DEFAULT_LAYER.get((model_type, total), default_layers(model_type, total)[-1])

"""LoRA settings and how they resolve to layers and module names (the MLP projections of
``editing.models.architecture``)."""

from __future__ import annotations

from dataclasses import dataclass

from editing.core.errors import ConfigError
from editing.models.architecture import ARCHITECTURES, mlp_modules


@dataclass
class LoRAConfig:
    """Low-rank adapters on the MLP up and down projections of a contiguous block of layers."""

    rank: int = 8
    """LoRA rank r."""
    alpha: float = 8.0
    """LoRA alpha (the update is scaled by alpha / rank)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    layer_fraction: float | None = 0.5
    """Fraction of all layers to adapt, as a block centred on the middle layer (ignored if start/end are set)."""
    layer_start: int | None = None
    """First adapted layer (0-based), with ``layer_end``."""
    layer_end: int | None = None
    """Last adapted layer (inclusive), with ``layer_start``."""
    target_modules: list[str] | None = None
    """Override the module-name suffixes to adapt (default: the architecture's MLP projections)."""

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"model.lora.rank={self.rank} must be a whole number >= 1 (e.g. 8)")
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha={self.alpha} must be > 0 (the update is scaled by alpha / rank)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout={self.dropout} must be in [0, 1)")


def lora_layers(cfg: LoRAConfig, total: int) -> list[int]:
    """The layers to adapt: ``layer_start..layer_end``, or a centred block covering ``layer_fraction``."""
    if cfg.layer_start is not None or cfg.layer_end is not None:
        if cfg.layer_start is None or cfg.layer_end is None:
            raise ConfigError("lora.layer_start and lora.layer_end must be set together")
        if not 0 <= cfg.layer_start <= cfg.layer_end < total:
            raise ConfigError(f"lora layers {cfg.layer_start}..{cfg.layer_end} are outside 0..{total - 1}")
        return list(range(cfg.layer_start, cfg.layer_end + 1))
    fraction = 1.0 if cfg.layer_fraction is None else cfg.layer_fraction
    if not 0 < fraction <= 1:
        raise ConfigError(f"lora.layer_fraction={fraction} must be in (0, 1]")
    count = max(1, min(total, round(fraction * total)))
    start = (total - count) // 2
    return list(range(start, start + count))


def mlp_target_modules(model_type: str) -> list[str]:
    """The MLP projection names LoRA adapts for ``model_type``."""
    modules = mlp_modules(model_type)
    if modules is None:
        raise ConfigError(f"no default LoRA targets for model type {model_type!r}; set lora.target_modules "
                          f"(known: {', '.join(ARCHITECTURES)})")
    return list(modules)

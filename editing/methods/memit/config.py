"""MEMIT settings (SPEC section 10) and per-model layer defaults. The sweep ranges (SPEC section 6) are written once,
in ``lightning_configs/sweeps/memit.yaml``, which the sweep and ``editing auto`` read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from editing.core.errors import ConfigError

Supervision = Literal["standard", "oracle"]

# Edited layers per (model type, number of layers): the reference's choices where it has one (GPT-2 small and
# GPT-J: 3..8; GPT-2 XL: 13..17; Llama-2-7B: 4..8), and for the 30-layer SmolLM2 the same early-middle block as
# GPT-J's 28 layers (about 10% to 30% of the depth).
DEFAULT_LAYERS: dict[tuple[str, int], list[int]] = {
    ("gpt2", 12): [3, 4, 5, 6, 7, 8],
    ("gpt2", 48): [13, 14, 15, 16, 17],
    ("gptj", 28): [3, 4, 5, 6, 7, 8],
    ("llama", 32): [4, 5, 6, 7, 8],
    ("llama", 30): [3, 4, 5, 6, 7, 8],
}

# Oracle subject spans of the built-in tasks: a field of the data line, or a regular expression on the prefix
# whose first group is the subject (pronoun_gender_bias: the career noun; verb_conjugation: the subject noun).
# temporal has neither (its prefixes are truncated entity names), so oracle supervision there needs a setting.
ORACLE_DEFAULTS: dict[str, dict[str, str]] = {
    "country_capital": {"field": "country"},
    "company_ceo": {"field": "company"},
    "stereoset": {"field": "target"},
    "pronoun_gender_bias": {"pattern": r"^The (.+) said"},
    "verb_conjugation": {"pattern": r"The (\w+)"},
}


@dataclass
class TargetSettings:
    """The settings the MEMIT family (MEMIT, ROME, AlphaEdit) shares: how the requests' subjects are found, how each
    target (value) vector is optimized, and over what the key statistics and context templates are computed.

    Each method's settings class derives from it, with its own ``section`` and defaults where SPEC gives others;
    ``family_checks`` holds the range checks of these fields, written once.
    """

    section: ClassVar[str] = "memit"
    """The settings' group under ``model.init_args`` (messages name ``<section>.<setting>``)."""

    kl_factor: float = 0.0625
    """Weight of KL(p0 || p) at the subject's last token of an "<subject> is a" prompt while optimizing the
    targets (swept, lightning_configs/sweeps/<method>.yaml)."""
    steps: int = 20
    """Adam steps optimizing each target vector."""
    lr: float = 0.5
    """Adam learning rate of the target optimization."""
    supervision: Supervision = "standard"
    """``standard``: the subject is the whole prefix; ``oracle``: an entity span of the prefix, from
    ``oracle_field`` or ``oracle_pattern`` (defaults exist for the built-in tasks except temporal)."""
    oracle_field: str | None = None
    """Oracle supervision: the field of each canonical line holding the subject (e.g. ``country``, ``company``,
    ``target``), found in the prefix ignoring case; a line whose prefix lacks it keeps the whole prefix (a warning
    counts them: a few country_capital lines put the country in the suffix)."""
    oracle_pattern: str | None = None
    """Oracle supervision: a regular expression searched in the prefix; its first group (or the whole match) is
    the subject, e.g. ``^The (.+) said`` for the career noun of pronoun_gender_bias."""
    covariance_samples: int = 100000
    """Tokens of the general set R over which C = E[k k^T] is estimated (cached on disk per model, layer, corpus
    and count, and shared by the methods of the family)."""
    covariance_batch_size: int = 16
    """Texts of R per forward pass while estimating C."""
    context_templates: int = 5
    """Model-generated prefixes the keys are averaged over, besides the bare prompt (0: the bare prompt only)."""
    context_template_length: int = 10
    """Tokens per generated prefix."""

    def family_checks(self) -> list[tuple[str, bool, str]]:
        """The range checks of the shared settings, in ``check_ranges``'s form."""
        return [
            ("kl_factor", self.kl_factor >= 0, "a number >= 0"),
            ("steps", self.steps >= 1, "at least 1"),
            ("lr", self.lr > 0, "a positive number"),
            ("covariance_samples", self.covariance_samples >= 1, "at least 1 token"),
            ("covariance_batch_size", self.covariance_batch_size >= 1, "at least 1"),
            ("context_templates", self.context_templates >= 0, "0 or more"),
            ("context_template_length", self.context_template_length >= 1, "at least 1"),
        ]

    def check(self, own: list[tuple[str, bool, str]]) -> None:
        """Raise ``ConfigError`` for the first failed check: the method's ``own`` first, then the shared ones and
        the subject rules."""
        check_ranges(self, own + self.family_checks())
        check_supervision(self)


def check_layer_list(cfg) -> None:
    """``<section>.layers``, when set, is a non-empty ascending list of distinct layers."""
    if cfg.layers is not None and (not cfg.layers or sorted(set(cfg.layers)) != list(cfg.layers)):
        raise ConfigError(f"{cfg.section}.layers={cfg.layers!r} must be a non-empty ascending list of distinct "
                          "layers")


@dataclass
class MEMITConfig(TargetSettings):
    """MEMIT: closed-form updates of the MLP down projections of a block of layers (SPEC section 10).

    Sweep ranges: ``lightning_configs/sweeps/memit.yaml`` (SPEC section 6).
    """

    section: ClassVar[str] = "memit"
    """The settings' group under ``model.init_args`` (messages name ``<section>.<setting>``); the MEMIT family's
    other methods (ROME, AlphaEdit) read the same requests and targets under their own group."""

    layers: list[int] | None = None
    """Edited layers, 0-based and ascending (default, None: per model, ``DEFAULT_LAYERS``, e.g. 3..8 for GPT-2 small,
    GPT-J and SmolLM2, 4..8 for Llama-2-7B; otherwise a block of six layers starting at a tenth of the depth). The
    target vectors live at the last one. The shipped configs leave it unset, so that a model preset gets its own."""
    clamp_norm_factor: float = 0.75
    """The residual change delta at the last edited layer is clamped to this times the norm of the original
    hidden state (swept, lightning_configs/sweeps/memit.yaml)."""
    covariance_weight: float = 15000.0
    """lambda: weight of the covariance statistics C against the new keys in (lambda C + K K^T)
    (swept, lightning_configs/sweeps/memit.yaml)."""
    weight_decay: float = 0.5
    """Weight of the penalty |delta| / |h| on the residual change (SPEC section 10)."""
    request_batch_size: int = 32
    """Requests whose target vectors are optimized together in one batch."""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the setting at fault."""
        self.check([
            ("clamp_norm_factor", self.clamp_norm_factor > 0, "a positive number"),
            ("covariance_weight", self.covariance_weight >= 0, "a number >= 0"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("request_batch_size", self.request_batch_size >= 1, "at least 1"),
        ])
        check_layer_list(self)


def check_ranges(cfg, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ConfigError`` ``<section>.<name>=<value> must be <expected>`` for the first failed check.

    Args:
        cfg: the settings (a dataclass with a ``section``).
        checks: ``(setting, holds, what it must be)`` in the order they are reported.
    """
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{cfg.section}.{name}={getattr(cfg, name)!r} must be {expected}")


def check_supervision(cfg) -> None:
    """The subject settings every method of the MEMIT family shares (``supervision``, ``oracle_field``,
    ``oracle_pattern``): a known supervision and at most one oracle rule."""
    if cfg.supervision not in ("standard", "oracle"):
        raise ConfigError(f"{cfg.section}.supervision={cfg.supervision!r}; expected 'standard' or 'oracle'")
    if cfg.oracle_field is not None and cfg.oracle_pattern is not None:
        raise ConfigError(f"set only one of {cfg.section}.oracle_field and {cfg.section}.oracle_pattern")


def default_layers(model_type: str | None, total: int) -> list[int]:
    """A model's default edited layers: ``DEFAULT_LAYERS``, or a block of six from a tenth of the depth."""
    if (model_type, total) in DEFAULT_LAYERS:
        return list(DEFAULT_LAYERS[(model_type, total)])
    start = min(total - 1, round(0.1 * total))
    return list(range(start, min(total, start + 6)))


def resolve_layers(cfg: MEMITConfig, model_type: str | None, total: int) -> list[int]:
    """The layers to edit: ``cfg.layers``, else the model's default (``default_layers``).

    Raises:
        ConfigError: a layer given is not one of the model's ``total`` layers.
    """
    if cfg.layers is not None:
        bad = [layer for layer in cfg.layers if not 0 <= layer < total]
        if bad:
            group = f"model.init_args.{cfg.section}.layers"
            raise ConfigError(f"{group}={list(cfg.layers)} names layer(s) {bad}, but the model "
                              f"({model_type or 'this model'}) has {total} layers (0..{total - 1}): leave "
                              f"{group} out for the model's default "
                              f"{default_layers(model_type, total)}, or give layers below {total}")
        return list(cfg.layers)
    return default_layers(model_type, total)

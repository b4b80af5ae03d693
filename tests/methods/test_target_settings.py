"""The settings the MEMIT family shares are defined and checked once (``TargetSettings``), each method reporting
them under its own group, with its own defaults where SPEC gives others."""

from __future__ import annotations

import dataclasses

import pytest

from editing.core.errors import ConfigError
from editing.methods.alphaedit.config import AlphaEditConfig
from editing.methods.memit.config import MEMITConfig, TargetSettings
from editing.methods.rome.config import ROMEConfig

FAMILY = [MEMITConfig, ROMEConfig, AlphaEditConfig]
SHARED = {f.name for f in dataclasses.fields(TargetSettings)}


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.section)
@pytest.mark.parametrize(("field", "bad", "expected"), [
    ("kl_factor", -1.0, "a number >= 0"), ("steps", 0, "at least 1"), ("lr", 0.0, "a positive number"),
    ("covariance_samples", 0, "at least 1 token"), ("covariance_batch_size", 0, "at least 1"),
    ("context_templates", -1, "0 or more"), ("context_template_length", 0, "at least 1"),
])
def test_a_bad_shared_setting_is_named_under_the_methods_group(cls, field, bad, expected) -> None:
    with pytest.raises(ConfigError, match=rf"^{cls.section}\.{field}={bad!r} must be {expected}$"):
        cls(**{field: bad}).validate()


@pytest.mark.parametrize("cls", FAMILY, ids=lambda c: c.section)
def test_the_subject_rules_are_checked_for_every_method(cls) -> None:
    with pytest.raises(ConfigError, match=rf"{cls.section}\.supervision='gold'"):
        cls(supervision="gold").validate()
    both = rf"only one of {cls.section}\.oracle_field and {cls.section}\.oracle_pattern"
    with pytest.raises(ConfigError, match=both):
        cls(oracle_field="country", oracle_pattern="(x)").validate()


def test_each_method_keeps_its_own_defaults() -> None:
    # SPEC 10-12: MEMIT and ROME optimize targets for 20 steps, AlphaEdit for 25; ROME clamps at 4 x |v0|
    assert {c.section: c().steps for c in FAMILY} == {"memit": 20, "rome": 20, "alphaedit": 25}
    assert {c.section: c().clamp_norm_factor for c in FAMILY} == {"memit": 0.75, "rome": 4.0, "alphaedit": 0.75}
    for cls in FAMILY:
        assert SHARED <= {f.name for f in dataclasses.fields(cls)}
        cls().validate()

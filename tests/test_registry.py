"""Every editing method is registered in one place, under the name it reports in results."""

from __future__ import annotations

import pytest

import editing.methods as methods
from editing.errors import ConfigError
from editing.methods.base import EditingModule
from editing.methods.registry import METHODS, get_method


def test_every_method_class_is_registered_under_its_name() -> None:
    exported = {getattr(methods, n) for n in methods.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, EditingModule)}
    assert classes == set(METHODS.values())
    for name, cls in METHODS.items():
        assert cls.method == name
        assert get_method(name) is cls


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="unknown method 'rome'"):
        get_method("rome")

"""Where the shipped configs are found (issue 36, item 1): the checkout's top-level ``lightning_configs/``, or the copy
an installed wheel holds inside the package; a missing config is an error naming the path and the fix, never class
defaults. The installed wheel itself: ``tests/commands/test_wheel.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

import editing.core.paths as paths
from editing.api import fit_args
from editing.core.errors import ConfigError
from editing.core.types import MethodName


def _configs(folder: Path) -> Path:
    (folder / "fit").mkdir(parents=True)
    (folder / "fit" / "lora.yaml").write_text("seed_everything: 0\n")
    return folder


def test_a_checkout_reads_its_top_level_folder(tmp_path):
    checkout = _configs(tmp_path / "repo" / "lightning_configs")
    _configs(tmp_path / "repo" / "editing" / "lightning_configs")  # a stray copy inside the package loses
    assert paths.configs_dir(tmp_path / "repo" / "editing") == checkout


def test_a_wheel_reads_the_copy_inside_the_package(tmp_path):
    installed = _configs(tmp_path / "site-packages" / "editing" / "lightning_configs")
    assert paths.configs_dir(tmp_path / "site-packages" / "editing") == installed


def test_no_configs_anywhere_names_both_places_and_the_fix(tmp_path):
    package = tmp_path / "site-packages" / "editing"
    with pytest.raises(ConfigError) as err:
        paths.configs_dir(package)
    message = str(err.value)
    assert str(tmp_path / "site-packages" / "lightning_configs") in message
    assert str(package / "lightning_configs") in message and "pip install --force-reinstall" in message


def test_this_checkout_resolves_to_its_own_folder():
    assert paths.configs_dir() == paths.REPO_DIR / "lightning_configs" == paths.CONFIGS_DIR


def test_edit_refuses_a_missing_shipped_config_instead_of_class_defaults(monkeypatch, tmp_path):
    # before: edit() quietly trained LoRAEditor's defaults (lr 1e-4, no accumulation) when the file was not found
    monkeypatch.setattr(paths, "FIT_DIR", tmp_path / "fit")
    with pytest.raises(ConfigError, match=r"shipped config .*fit/lora\.yaml is missing; reinstall"):
        fit_args(MethodName.LORA, "tiny-gpt2", "country_capital", ["1e-04"], tmp_path / "out")


def test_edit_passes_the_shipped_config():
    args = fit_args(MethodName.LORA, "tiny-gpt2", "country_capital", ["1e-04"], Path("out"))
    assert args[:2] == ["--config", str(paths.FIT_DIR / "lora.yaml")]


def test_readme_config_paths_read_the_shipped_files_from_any_folder(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert paths.shipped_config_path("lightning_configs/fit/lora.yaml") == str(paths.CONFIGS_DIR / "fit" / "lora.yaml")
    assert paths.shipped_config_path("lightning_configs/fit/nope.yaml") == "lightning_configs/fit/nope.yaml"
    assert paths.shipped_config_path("mine.yaml") == "mine.yaml"
    # a file of that name in the current folder is the user's and wins
    _configs(tmp_path / "lightning_configs")
    assert paths.shipped_config_path("lightning_configs/fit/lora.yaml") == "lightning_configs/fit/lora.yaml"

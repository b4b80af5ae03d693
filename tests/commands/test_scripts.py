"""The shell scripts of ``scripts/``: each parses; the comparison refuses to start without its Backpack or with
methods it does not run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
SCRIPTS = sorted(SCRIPTS_DIR.rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(SCRIPTS_DIR)) for p in SCRIPTS])
def test_script_parses(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_comparison_names_the_missing_backpack_before_any_work(tmp_path) -> None:
    script = next(p for p in SCRIPTS if p.name == "comparison_smollm2.sh")
    missing = tmp_path / "no-backpack"
    env = {**os.environ, "BACKPACK": str(missing), "COMPARE_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert f"no distilled Backpack at {missing}" in done.stderr and "scripts/backpack_smollm2.sh" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize("methods", ["lora wise", "  "])
def test_comparison_refuses_a_methods_list_it_cannot_run(tmp_path, methods: str) -> None:
    script = next(p for p in SCRIPTS if p.name == "comparison_smollm2.sh")
    env = {**os.environ, "METHODS": methods, "COMPARE_OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "METHODS" in done.stderr and "lora full memit rome alphaedit" in done.stderr
    if methods.strip():
        assert "'wise'" in done.stderr
    assert not (tmp_path / "out").exists()

"""Every YAML under lightning_configs/ parses with the LightningCLI parser, and the parser keeps its values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO_DIR

from editing.cli import main
from editing.tasks import get_task

CONFIG_DIR = REPO_DIR / "lightning_configs"
ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))
# configs of commands other than fit/validate/test, each checked by its own test (sweeps/: tests/test_sweep.py)
OTHER_KINDS = ("distill", "ensemble", "sweeps")
CONFIGS = [p for p in ALL_CONFIGS if p.relative_to(CONFIG_DIR).parts[0] not in OTHER_KINDS]
DISTILL = [p for p in ALL_CONFIGS if p.relative_to(CONFIG_DIR).parts[0] == "distill"]
ENSEMBLE = [p for p in ALL_CONFIGS if p.relative_to(CONFIG_DIR).parts[0] == "ensemble"]
PARAMS = [pytest.param(p, id=str(p.relative_to(CONFIG_DIR))) for p in CONFIGS] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no YAML under lightning_configs/ yet"), id="none")]


def _normalize(node):
    """Fold ``init_args`` into its parent, so ``model: {base: ...}`` and the printed subclass form compare."""
    if isinstance(node, dict):
        merged = {k: v for k, v in node.items() if k != "init_args"}
        merged.update(node.get("init_args") or {})
        return {k: _normalize(v) for k, v in merged.items()}
    if isinstance(node, list):
        return [_normalize(v) for v in node]
    return node


def _leaves(node, prefix=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix, node


def _get(node, path):
    for key in path:
        assert isinstance(node, dict) and key in node, f"key {'.'.join(path)} missing from the printed config"
        node = node[key]
    return node


@pytest.mark.parametrize("path", PARAMS)
def test_config_parses_and_keeps_its_values(path: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    with pytest.raises(SystemExit) as info:
        main(["validate", "--config", str(path), "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), captured.err
    printed = _normalize(yaml.safe_load(captured.out))
    assert {"trainer", "model", "data", "report"} <= set(printed)
    source = _normalize(yaml.safe_load(path.read_text()) or {})
    for key_path, value in _leaves(source):
        got = _get(printed, key_path)
        if key_path[-1] == "class_path":
            assert str(got).endswith(str(value)), key_path
        else:
            assert got == value, f"{'.'.join(key_path)}: file has {value!r}, parser gives {got!r}"
    task = printed["data"]["task"]
    assert get_task(task) is not None  # a typo in a task name is caught here, not hours into a sweep


TINY = [p for p in PARAMS if p.values[0] is not None
        and str(_normalize(yaml.safe_load(p.values[0].read_text()) or {}).get("model", {}).get("base", {})
                .get("name", "")).startswith("tiny-")]


@pytest.mark.parametrize("path", TINY or [pytest.param(None, marks=pytest.mark.skip(reason="no tiny config"))])
def test_tiny_configs_run(path: Path, tmp_path, monkeypatch):
    """Configs on tiny random models are cheap: run them for real (results into tmp_path)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(["validate", "--config", str(path), "--report.output_dir", str(out), "--report.overwrite", "true"])
    record = json.loads((out / "evaluation.json").read_text())
    assert record["metrics"]["success_rate"] is not None
    assert record["counts"]["evaluation"] == len((out / "evaluation_scores.jsonl").read_text().splitlines())


@pytest.mark.parametrize("path", DISTILL, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_distill_config_parses_and_keeps_its_values(path: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    with pytest.raises(SystemExit) as info:
        main(["backpack", "distill", "--config", str(path), "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), captured.err
    printed = _normalize(yaml.safe_load(captured.out))
    for key_path, value in _leaves(_normalize(yaml.safe_load(path.read_text()))):
        assert _get(printed, key_path) == value, ".".join(key_path)


@pytest.mark.parametrize("path", ENSEMBLE, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_ensemble_config_names_real_settings(path: Path):
    import inspect

    from editing.commands.ensemble import run_ensemble

    settings = yaml.safe_load(path.read_text())
    params = inspect.signature(run_ensemble).parameters
    assert set(settings) <= set(params), f"unknown settings {set(settings) - set(params)}"
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
    assert required <= set(settings)
    assert get_task(settings["task"]) is not None

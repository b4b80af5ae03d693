"""Every YAML under lightning_configs/ parses with the parser of its command and keeps its values, alone and in the
combinations the configs are made for (a method's fit file + a task file + a model preset), and the sweep finds a
method's fit file for any task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO_DIR

from editing.cli import main
from editing.tasks import BUILTIN_TASKS, get_task

CONFIG_DIR = REPO_DIR / "lightning_configs"
ALL_CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml")) + sorted(CONFIG_DIR.rglob("*.yml"))


def _kind(path: Path) -> str:
    return path.relative_to(CONFIG_DIR).parts[0]


def _of(*kinds: str) -> list[Path]:
    return [p for p in ALL_CONFIGS if _kind(p) in kinds]


def _ids(paths) -> list[str]:
    return [str(p.relative_to(CONFIG_DIR)) for p in paths]


FIT = _of("fit")
TASKS = _of("tasks")
MODELS = _of("models")
# whole LightningCLI runs (fit/validate/test), each parsed alone
WHOLE = _of("main", "tiny", "validate", "fit")
DISTILL = _of("distill")
ENSEMBLE = _of("ensemble")
# every kind of file has a test here, except the search spaces (tests/test_sweep.py parses those)
TESTED_KINDS = {"fit", "tasks", "models", "main", "tiny", "validate", "distill", "ensemble", "sweeps"}


def test_every_config_folder_is_tested() -> None:
    assert {_kind(p) for p in ALL_CONFIGS} <= TESTED_KINDS
    assert FIT and TASKS and MODELS and DISTILL and ENSEMBLE


def test_the_per_task_copies_are_gone() -> None:
    """One fit file per method, for any task: no folder of per-task copies."""
    assert sorted(p.stem for p in FIT) == ["full", "lora", "memit", "senses"]
    assert all(p.parent == CONFIG_DIR / "fit" for p in FIT)
    assert sorted(p.stem for p in TASKS) == sorted(BUILTIN_TASKS)


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


def _printed(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as info:
        main([*args, "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), captured.err
    return _normalize(yaml.safe_load(captured.out))


def _assert_keeps(printed: dict, path: Path) -> None:
    """Every value of the file ``path`` is what the parser resolved."""
    for key_path, value in _leaves(_normalize(yaml.safe_load(path.read_text()) or {})):
        got = _get(printed, key_path)
        if key_path[-1] == "class_path":
            assert str(got).endswith(str(value).rsplit(".", 1)[-1]), key_path
        else:
            assert got == value, f"{path.name}: {'.'.join(key_path)}: file has {value!r}, parser gives {got!r}"


def _command(path: Path) -> str:
    """The LightningCLI command a whole-run file is for (a file with a budget or a method is a fit)."""
    data = yaml.safe_load(path.read_text()) or {}
    model = data.get("model") or {}
    return "fit" if "budget" in data or "class_path" in model else "validate"


@pytest.mark.parametrize("path", WHOLE, ids=_ids(WHOLE))
def test_config_parses_and_keeps_its_values(path: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    printed = _printed(capsys, [_command(path), "--config", str(path)])
    assert {"trainer", "model", "data", "report"} <= set(printed)
    _assert_keeps(printed, path)
    assert get_task(printed["data"]["task"]) is not None  # a typo in a task name is caught here, not in a sweep


@pytest.mark.parametrize("task", TASKS, ids=_ids(TASKS))
@pytest.mark.parametrize("fit", FIT, ids=_ids(FIT))
def test_fit_file_composes_with_every_task(fit: Path, task: Path, capsys, monkeypatch):
    """``fit/<method>.yaml`` + ``tasks/<task>.yaml``: the method's settings and the task's, both kept."""
    monkeypatch.chdir(REPO_DIR)
    printed = _printed(capsys, ["fit", "--config", str(fit), "--config", str(task)])
    _assert_keeps(printed, fit)
    _assert_keeps(printed, task)
    assert printed["data"]["task"] == task.stem


@pytest.mark.parametrize("preset", MODELS, ids=_ids(MODELS))
def test_model_preset_composes_after_a_fit_file_and_a_task(preset: Path, capsys, monkeypatch):
    """A model preset after a method's file replaces its model and nothing else."""
    monkeypatch.chdir(REPO_DIR)
    fit = CONFIG_DIR / "fit" / ("senses.yaml" if "backpack" in preset.stem else "lora.yaml")
    task = CONFIG_DIR / "tasks" / "stereoset.yaml"
    printed = _printed(capsys, ["fit", "--config", str(fit), "--config", str(task), "--config", str(preset)])
    _assert_keeps(printed, preset)
    _assert_keeps(printed, task)
    method_keys = {k: v for k, v in (yaml.safe_load(fit.read_text())["model"]["init_args"]).items() if k != "base"}
    for key_path, value in _leaves(method_keys):
        assert _get(printed["model"], key_path) == value, key_path


@pytest.mark.parametrize("preset", MODELS, ids=_ids(MODELS))
def test_validate_with_a_model_preset_and_a_task(preset: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    base = CONFIG_DIR / "validate" / "smollm2-135m.yaml"
    task = CONFIG_DIR / "tasks" / "temporal.yaml"
    printed = _printed(capsys, ["validate", "--config", str(base), "--config", str(task), "--config", str(preset)])
    _assert_keeps(printed, preset)
    assert printed["data"]["task"] == "temporal" and printed["trainer"]["logger"] is False


# the oracle subject span each removed lightning_configs/fit/<task>/memit.yaml set for its task
REMOVED_PER_TASK_ORACLE = {"country_capital": ("field", "country"), "company_ceo": ("field", "company"),
                           "stereoset": ("field", "target"), "pronoun_gender_bias": ("pattern", r"^The (.+) said"),
                           "verb_conjugation": ("pattern", r"The (\w+)"), "temporal": None}


@pytest.mark.parametrize("task", sorted(REMOVED_PER_TASK_ORACLE))
def test_memit_oracle_span_per_task_without_per_task_files(task: str, capsys, monkeypatch):
    """fit/memit.yaml + tasks/<task>.yaml supervises with the same subject span as the per-task file it replaces."""
    from editing.errors import ConfigError
    from editing.methods.memit.config import MEMITConfig
    from editing.methods.memit.requests import oracle_rule

    monkeypatch.chdir(REPO_DIR)
    printed = _printed(capsys, ["fit", "--config", str(CONFIG_DIR / "fit" / "memit.yaml"), "--config",
                                str(CONFIG_DIR / "tasks" / f"{task}.yaml"), "--model.init_args.memit.supervision",
                                "oracle"])
    cfg = MEMITConfig(**printed["model"]["memit"])
    assert cfg.supervision == "oracle"
    if REMOVED_PER_TASK_ORACLE[task] is None:
        with pytest.raises(ConfigError, match="oracle_field"):
            oracle_rule(cfg, task)
    else:
        assert oracle_rule(cfg, task) == REMOVED_PER_TASK_ORACLE[task]


@pytest.mark.parametrize("path", TASKS, ids=_ids(TASKS))
def test_task_files_hold_only_data_keys(path: Path):
    """A task file composes with any method and model only if it sets nothing else."""
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"data"} and data["data"]["task"] == path.stem


@pytest.mark.parametrize("path", MODELS, ids=_ids(MODELS))
def test_model_presets_hold_only_the_base_model(path: Path):
    data = yaml.safe_load(path.read_text())
    assert set(data) == {"model"} and set(data["model"]) == {"base"} and data["model"]["base"]["name"]


TINY = [p for p in WHOLE if str(_normalize(yaml.safe_load(p.read_text()) or {}).get("model", {}).get("base", {})
                                .get("name", "")).startswith("tiny-")]


@pytest.mark.parametrize("path", TINY, ids=_ids(TINY))
def test_tiny_configs_run(path: Path, tmp_path, monkeypatch):
    """Configs on tiny random models are cheap: run them for real (results into tmp_path)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    main(["validate", "--config", str(path), "--report.output_dir", str(out), "--report.overwrite", "true"])
    record = json.loads((out / "evaluation.json").read_text())
    assert record["metrics"]["success_rate"] is not None
    assert record["counts"]["evaluation"] == len((out / "evaluation_scores.jsonl").read_text().splitlines())


@pytest.mark.parametrize("path", DISTILL, ids=_ids(DISTILL))
def test_distill_config_parses_and_keeps_its_values(path: Path, capsys, monkeypatch):
    monkeypatch.chdir(REPO_DIR)
    with pytest.raises(SystemExit) as info:
        main(["backpack", "distill", "--config", str(path), "--print_config"])
    captured = capsys.readouterr()
    assert info.value.code in (0, None), captured.err
    printed = _normalize(yaml.safe_load(captured.out))
    for key_path, value in _leaves(_normalize(yaml.safe_load(path.read_text()))):
        assert _get(printed, key_path) == value, ".".join(key_path)


@pytest.mark.parametrize("path", ENSEMBLE, ids=_ids(ENSEMBLE))
def test_ensemble_config_parses_with_a_task(path: Path):
    """An ensemble file holds the large model's settings; the task and the Backpack edits come on the command
    line, through the command's own parser."""
    from editing.commands import function_parser
    from editing.commands.ensemble import run_ensemble

    settings = yaml.safe_load(path.read_text())
    assert "task" not in settings and "backpack_edits" not in settings and "output_dir" not in settings
    parser = function_parser("ensemble", run_ensemble, "")
    cfg = parser.parse_args(["--config", str(path), "--task", "temporal", "--backpack_edits", "runs/fit/version_0"])
    for key, value in settings.items():
        assert cfg[key] == value, key
    assert cfg.task == "temporal" and get_task(cfg.task) is not None


def test_sweep_uses_the_method_file_for_a_task_of_your_own(tmp_path, capsys, monkeypatch):
    """``editing sweep`` on a user's task YAML needs no --base_config: the method's fit file is the base, and the
    trials' arguments resolve to the user's task with the method's settings."""
    from editing.sweep import make_definition

    task = tmp_path / "my_task.yaml"
    task.write_text("loss: good\nthreshold: 1.6\ncanonical: data-{split}.jsonl\nevaluation: data-{split}.jsonl\n")
    definition = make_definition(str(task), "lora", "tiny-gpt2", args=["--trainer.max_epochs", "2"])
    fit_file = CONFIG_DIR / "fit" / "lora.yaml"
    assert definition.base_config == fit_file.read_text()
    base = tmp_path / "base.yaml"
    base.write_text(definition.base_config)
    monkeypatch.chdir(REPO_DIR)
    settings = definition.fit_settings(base, tmp_path / "trial", housekeeping=False)
    printed = _printed(capsys, ["fit", *settings.args()])
    assert printed["data"]["task"] == str(task)
    assert printed["model"]["base"]["name"] == "tiny-gpt2" and printed["trainer"]["max_epochs"] == 2
    for key, value in _normalize(yaml.safe_load(fit_file.read_text()))["model"]["lora"].items():
        assert printed["model"]["lora"][key] == value, key


def test_sweep_names_the_methods_when_a_method_has_no_fit_file():
    from editing.errors import ConfigError
    from editing.sweep import make_definition

    with pytest.raises(ConfigError, match=r"no base fit config .*nosuch\.yaml.*full, lora, memit, senses"):
        make_definition("country_capital", "nosuch", "tiny-gpt2", space=[str(CONFIG_DIR / "sweeps" / "lora.yaml")])


def _keys(node, found: list[tuple[str, object]]) -> list[tuple[str, object]]:
    if isinstance(node, dict):
        for key, value in node.items():
            found.append((key, value))
            _keys(value, found)
    elif isinstance(node, list):
        for value in node:
            _keys(value, found)
    return found


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_ids(ALL_CONFIGS))
def test_shipped_configs_keep_the_papers_epoch_rule(path: Path) -> None:
    """SPEC section 6: train every epoch and report the last one inside each ball. A shipped config that sets a
    patience (or an early-stopping callback) would stop a run at its first epoch outside the largest ball."""
    node = yaml.safe_load(path.read_text())
    patience = [value for key, value in _keys(node, []) if key == "patience" and value is not None]
    assert not patience, f"{path.relative_to(CONFIG_DIR)} sets patience {patience}"
    assert "EarlyStopping" not in path.read_text(), f"{path.relative_to(CONFIG_DIR)} adds an early-stopping callback"

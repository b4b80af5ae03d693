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
from editing.rules.tasks import BUILTIN_TASKS, get_task

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
LOGGERS = _of("loggers")
# every kind of file has a test here, except the search spaces (tests/protocol/test_sweep.py parses those)
TESTED_KINDS = {"fit", "tasks", "models", "main", "tiny", "validate", "distill", "ensemble", "sweeps", "loggers"}


def test_every_config_folder_is_tested() -> None:
    assert {_kind(p) for p in ALL_CONFIGS} <= TESTED_KINDS
    assert FIT and TASKS and MODELS and DISTILL and ENSEMBLE and LOGGERS


@pytest.mark.parametrize("preset", LOGGERS, ids=_ids(LOGGERS))
def test_logger_preset_composes_after_a_fit_file_and_holds_only_the_logger(preset: Path, capsys, monkeypatch):
    data = yaml.safe_load(preset.read_text())
    assert set(data) == {"trainer"} and set(data["trainer"]) == {"logger"}
    monkeypatch.chdir(REPO_DIR)
    printed = _printed(capsys, ["fit", "--config", str(FIT[0]), "--config", str(preset)])
    assert printed["trainer"]["logger"]["class_path"] == data["trainer"]["logger"]["class_path"]


def test_the_per_task_copies_are_gone() -> None:
    """One fit file per method, for any task: no folder of per-task copies."""
    import editing.methods  # noqa: F401  (registers every method package)
    from editing.methods.registry import METHODS

    # one fit file per registered method (a method added tomorrow ships its own), and none for an unknown name
    assert sorted(p.stem for p in FIT) == sorted(m.value for m in METHODS)
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
    from editing.core.errors import ConfigError
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
    from editing.protocol.sweep import make_definition

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
    from editing.core.errors import ConfigError
    from editing.protocol.sweep import make_definition

    known = r"there are: .*full, .*lora, memit, .*senses"  # every method's fit file (more methods: more names)
    with pytest.raises(ConfigError, match=r"no base fit config .*nosuch\.yaml.*" + known):
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


# ----------------------------------------------------------------------------------------------------------------
# issue 34 item 18: every method file composed with every model preset resolves to that model's settings
# ----------------------------------------------------------------------------------------------------------------
# Each transformer preset's architecture, from its Hugging Face config (model type, transformer layers), and the
# MEMIT layers it must edit: the reference's choice where it has one (GPT-2 small and GPT-J 3..8, Llama-2-7B 4..8;
# SmolLM2 the same early-middle block, 3..8), otherwise a block of six layers from a tenth of the depth (rounded),
# cut at the last layer.
PRESET_MEMIT_LAYERS = {
    "gpt2": (("gpt2", 12), [3, 4, 5, 6, 7, 8]),
    "gpt-j-6b": (("gptj", 28), [3, 4, 5, 6, 7, 8]),
    "llama-2-7b": (("llama", 32), [4, 5, 6, 7, 8]),
    "smollm2-135m": (("llama", 30), [3, 4, 5, 6, 7, 8]),
    "pythia-70m": (("gpt_neox", 6), [1, 2, 3, 4, 5]),
    "pythia-160m": (("gpt_neox", 12), [1, 2, 3, 4, 5, 6]),
    "pythia-410m": (("gpt_neox", 24), [2, 3, 4, 5, 6, 7]),
    "pythia-1b": (("gpt_neox", 16), [2, 3, 4, 5, 6, 7]),
    "pythia-1.4b": (("gpt_neox", 24), [2, 3, 4, 5, 6, 7]),
    "pythia-2.8b": (("gpt_neox", 32), [3, 4, 5, 6, 7, 8]),
    "pythia-6.9b": (("gpt_neox", 32), [3, 4, 5, 6, 7, 8]),
}
BACKPACK_PRESETS = {"backpack-gpt2", "smollm2-135m-backpack"}  # MEMIT does not edit Backpacks


def test_every_model_preset_has_its_memit_layers_here() -> None:
    assert set(PRESET_MEMIT_LAYERS) | BACKPACK_PRESETS == {p.stem for p in MODELS}


def _architecture_model(model_type: str, layers: int):
    """A random model of ``model_type`` with the preset's number of layers and a tiny width."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

    config = {"gpt2": lambda: GPT2Config(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, n_positions=64),
              "gptj": lambda: GPTJConfig(vocab_size=64, n_embd=16, n_layer=layers, n_head=2, rotary_dim=4,
                                         n_positions=64),
              "llama": lambda: LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                           max_position_embeddings=64),
              "gpt_neox": lambda: GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=layers, num_attention_heads=2,
                                                max_position_embeddings=64)}[model_type]()
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("preset", MODELS, ids=_ids(MODELS))
@pytest.mark.parametrize("fit", FIT, ids=_ids(FIT))
def test_method_file_with_model_preset_resolves_to_the_models_settings(fit: Path, preset: Path, capsys, monkeypatch):
    """``fit/<method>.yaml`` + ``models/<preset>.yaml``: the preset's model, the method's settings, and nothing in the
    method file that belongs to one model (MEMIT's layers: the model's own default, built here on a random model of
    the preset's architecture)."""
    monkeypatch.chdir(REPO_DIR)
    printed = _printed(capsys, ["fit", "--config", str(fit), "--config", str(preset)])
    _assert_keeps(printed, preset)
    method = {k: v for k, v in _normalize(yaml.safe_load(fit.read_text()))["model"].items()
              if k not in ("base", "class_path")}
    for key_path, value in _leaves(method):
        assert _get(printed["model"], key_path) == value, key_path
    if fit.stem != "memit" or preset.stem in BACKPACK_PRESETS:
        return
    assert printed["model"]["memit"].get("layers") is None, "fit/memit.yaml pins layers for every model"
    import editing.methods.base as base_module
    from editing.methods.memit.config import MEMITConfig
    from editing.methods.memit.module import MEMITEditor
    from editing.models.loading import LoadedModel, load_model

    (model_type, layers), want = PRESET_MEMIT_LAYERS[preset.stem]
    tokenizer = load_model(name="tiny-gpt2").tokenizer
    monkeypatch.setattr(base_module, "load_model",
                        lambda config: LoadedModel(_architecture_model(model_type, layers).eval(), tokenizer, 64))
    editor = MEMITEditor(memit=MEMITConfig(**printed["model"]["memit"]))
    assert editor.memit_layers == want


def test_memit_layers_outside_the_model_are_a_config_error_naming_the_setting_and_the_layer_count() -> None:
    from editing.core.errors import ConfigError
    from editing.methods.memit.config import MEMITConfig
    from editing.methods.memit.module import MEMITEditor
    from editing.models.loading import ModelConfig

    # tiny-neox has 4 layers: the old fit/memit.yaml's 3..8 names four that do not exist
    with pytest.raises(ConfigError, match=r"model\.init_args\.memit\.layers.*\[4, 5, 6, 7, 8\].*4 layers"):
        MEMITEditor(base=ModelConfig(name="tiny-neox"), memit=MEMITConfig(layers=[3, 4, 5, 6, 7, 8]))
    assert MEMITEditor(base=ModelConfig(name="tiny-neox"), memit=MEMITConfig()).memit_layers == [0, 1, 2, 3]


def test_memits_search_space_is_written_once() -> None:
    """The MEMIT ranges of SPEC section 6 live in lightning_configs/sweeps/memit.yaml only (the sweep reads it): no
    second copy in the package's code to drift from it."""
    import ast

    import editing.methods.memit as memit_package
    from editing.core.paths import PACKAGE_DIR
    from editing.protocol.space import load_space

    space = load_space("memit")
    assert {k: (p.kind, list(p.args)) for k, p in space.items()} == {
        "model.init_args.memit.clamp_norm_factor": ("log10_uniform", [-1.35, 0.0]),
        "model.init_args.memit.covariance_weight": ("int_uniform", [9000, 75000]),
        "model.init_args.memit.kl_factor": ("uniform", [0.001, 0.1])}
    assert not hasattr(memit_package, "SWEEP_SPACE")
    for path in PACKAGE_DIR.rglob("*.py"):
        numbers = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, (int, float))}
        assert not {1.35, 75000} & numbers, f"{path} holds a copy of MEMIT's search space"

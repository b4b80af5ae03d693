"""Typed results records and the one atomic-write helper.

A tiny fit's ``results.json`` reads back as a ``RunRecord`` equal to what was written (and re-serialises to the same
bytes); files written before ``schema_version`` existed (fixtures made by a real tiny fit, validate and apply of the
code of 8f52fd8) read as schema 1 without losing a field; a newer or unknown schema and a malformed field are refused
with a message naming the file and field; ``editing.core.files`` never leaves a partial file or folder behind when the
writer fails midway, and never overwrites a result unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest

from callbacks.degradation_budget import DegradationBudget
from editing.core.files import (
    ResultsExistError,
    atomic_open,
    create_exclusive,
    jsonable,
    save_atomically,
    write_json,
    write_text,
)
from editing.core.types import LossType, Metric, RunStatus, Stage
from editing.data.datamodule import TaskDataModule
from editing.methods import LoRAConfig, LoRAEditor, OptimizerConfig
from editing.models.loading import ModelConfig
from editing.runs.records import (
    SCHEMA_VERSION,
    EvaluationRecord,
    RecordError,
    RunRecord,
    Selection,
    TrialRecord,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "records"
RESULTS_V1 = FIXTURES / "results_schema1.json"  # `editing fit` of LoRA on tiny-gpt2, balls [0.5, 1e-3], 2 epochs
STOPPED_V1 = FIXTURES / "results_stopped_early_schema1.json"  # the same with --budget.patience 1: stopped early
VALIDATE_V1 = FIXTURES / "evaluation_validate_schema1.json"  # `editing validate` (with its config)
APPLY_V1 = FIXTURES / "evaluation_apply_schema1.json"  # `editing apply` of the 1e-03 edit (no config)


def _dumped(data: dict) -> str:
    """The bytes ``write_json`` writes for ``data``."""
    return json.dumps(jsonable(data), indent=2) + "\n"


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders (the helper's staging names start with a dot)."""
    return sorted(p.name for p in folder.rglob(".*"))


# ----------------------------------------------------------------------------------------------------------------
# a fit's record: written, read back, equal
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_fit(tmp_path_factory, data_root):
    """A LoRA fit on tiny-gpt2 (2 epochs) through the DegradationBudget callback: its folder and callback."""
    run = tmp_path_factory.mktemp("fit") / "run"
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4),
                        optimizer=OptimizerConfig(lr=3e-3))
    budget = DegradationBudget(output_dir=str(run), balls=[0.5, 1e-3], patience=100)
    L.Trainer(max_epochs=2, limit_train_batches=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              enable_checkpointing=False, callbacks=[budget], default_root_dir=str(run.parent)).fit(
        module, TaskDataModule(task="country_capital", eval_limit=4, general_limit=4))
    return run, budget


def test_run_record_round_trip(tiny_fit) -> None:
    run, budget = tiny_fit
    path = run / "results.json"
    raw = json.loads(path.read_text())
    record = RunRecord.read(path)
    # read back: equal to itself written and read again, and the same bytes as the file
    assert RunRecord.from_dict(record.to_dict()) == record
    assert _dumped(record.to_dict()) == path.read_text()
    assert raw["schema_version"] == SCHEMA_VERSION == record.schema_version
    # the typed fields hold what the file says, read independently by key
    assert record.method == raw["method"] == "lora" and record.status is RunStatus.FINISHED
    assert record.task.loss is LossType.GOOD and record.task.name == "country_capital"
    assert [e.epoch for e in record.epochs] == [e["epoch"] for e in raw["epochs"]] == [0, 1, 2]
    assert [e.to_dict() for e in record.epochs] == raw["epochs"] == json.loads(json.dumps(budget.history))
    assert set(record.edits) == set(raw["balls"]) == {"5e-01", "1e-03"}
    # the balls against SPEC section 6, recomputed here: the last epoch whose general NLL is strictly below
    # (1 + eps) x epoch 0's, and the success change in percentage points at that epoch
    nll0, success0 = raw["epochs"][0]["general_nll"], raw["epochs"][0]["success_rate"]
    for key, eps in (("5e-01", 0.5), ("1e-03", 1e-3)):
        inside = [e["epoch"] for e in raw["epochs"] if e["general_nll"] < (1 + eps) * nll0]
        want = max(inside)
        ball = record.balls[key]
        assert ball.epoch == want
        epoch = raw["epochs"][want]
        assert ball.success_change_pp == 100.0 * (epoch["success_rate"] - success0)
        assert ball.metrics.degradation == epoch["general_nll"] / nll0 - 1.0
        assert ball.metrics[Metric.HARD_NEGATIVE_NLL] == epoch["hard_negative_nll"]
    # an edit folder per ball, complete, and no staging left in the run folder
    for folder in record.edits.values():
        assert (Path(folder) / "edit_manifest.json").is_file()
    assert _leftovers(run) == []


def test_trial_outcome_of_a_fit_keeps_what_select_and_report_read(tiny_fit) -> None:
    run, _ = tiny_fit
    raw = json.loads((run / "results.json").read_text())
    outcome = TrialRecord.of_run(RunRecord.read(run / "results.json"), trial=3, params={"lr": 0.1}).outcome()
    assert outcome["status"] == "finished" and outcome["num_parameters"] == raw["model"]["num_parameters"]
    for key, b in raw["balls"].items():
        assert outcome["balls"][key] == {"epoch": b["epoch"], "success_change_pp": b["success_change_pp"],
                                         "degradation": b["metrics"]["degradation"],
                                         "success_rate": b["metrics"]["success_rate"],
                                         "hard_negative_nll": b["metrics"]["hard_negative_nll"]}
    assert [h["general_nll"] for h in outcome["history"]] == [e["general_nll"] for e in raw["epochs"]]
    assert TrialRecord.from_dict({"trial": 3, "params": {"lr": 0.1}, **outcome}).outcome() == outcome


def test_a_failed_edit_export_leaves_no_partial_edit_folder(tmp_path, data_root, monkeypatch) -> None:
    """An export that fails midway (here after writing its tensors) leaves no ``edits/ball_*`` folder and no
    staging folder: a partial edit must not pass for a finished one."""
    run = tmp_path / "run"
    real = LoRAEditor.export_edit

    def half_export(self, folder, state=None):
        self.model.save_pretrained(str(folder))  # the adapter's tensors are written ...
        raise RuntimeError("killed while exporting")  # ... but not its identity or manifest

    monkeypatch.setattr(LoRAEditor, "export_edit", half_export)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        enable_checkpointing=False, default_root_dir=str(tmp_path),
                        callbacks=[DegradationBudget(output_dir=str(run), balls=[0.5])])
    with pytest.raises(RuntimeError, match="killed while exporting"):
        trainer.fit(module, TaskDataModule(task="country_capital", eval_limit=2, general_limit=2))
    assert not (run / "edits" / "ball_5e-01").exists()
    assert not (run / "results.json").exists()
    assert _leftovers(run) == []
    monkeypatch.setattr(LoRAEditor, "export_edit", real)


# ----------------------------------------------------------------------------------------------------------------
# schema 1: files written before schema_version existed
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [RESULTS_V1, STOPPED_V1], ids=["finished", "stopped-early"])
def test_schema_1_results_file_reads_without_losing_a_field(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert "schema_version" not in raw
    record = RunRecord.read(path)
    assert record.schema_version == 1
    rewritten = record.to_dict()
    assert rewritten.pop("schema_version") == SCHEMA_VERSION
    # every field, in its order and with its value: today's file is the new layout less the version
    assert list(rewritten) == list(raw) and _dumped(rewritten) == path.read_text()
    assert record.task.threshold == raw["task"]["threshold"] and record.seed == raw["seed"]
    assert record.num_parameters == raw["model"]["num_parameters"]
    assert record.initial.metrics.general_nll == raw["epochs"][0]["general_nll"]
    if raw["stopped_early"] is None:
        assert record.stopped_early is None
    else:
        assert record.stopped_early.to_dict() == raw["stopped_early"]


@pytest.mark.parametrize("path,stage", [(VALIDATE_V1, Stage.VALIDATE), (APPLY_V1, Stage.APPLY)])
def test_schema_1_evaluation_file_reads_without_losing_a_field(path: Path, stage: Stage) -> None:
    raw = json.loads(path.read_text())
    record = EvaluationRecord.read(path)
    assert record.schema_version == 1 and record.stage is stage
    assert record.metrics.to_dict() == raw["metrics"]
    rewritten = record.to_dict()
    rewritten.pop("schema_version")
    assert list(rewritten) == list(raw) and _dumped(rewritten) == path.read_text()
    assert (record.config is None) == ("config" not in raw)


def test_report_reads_a_schema_1_test_run(tmp_path) -> None:
    """A sweep whose test run was written before schema_version existed still reports, with the file's numbers."""
    from editing.protocol.report import load_study

    raw = json.loads(RESULTS_V1.read_text())
    study = tmp_path / "st"
    selection = {"study": "st", "trials": 1, "sweep": {"task": "country_capital", "model": "tiny-gpt2",
                                                       "method": "lora", "base_config": "", "space": {}, "args": [],
                                                       "seed": 0},
                 "balls": {"1e-03": {"trial": 0, "params": {}, "epoch": 2, "success_change_pp": 0.0,
                                     "degradation": 0.0}}}  # a schema-1 selection.json: no version either
    write_json(study / "selection.json", selection)
    (study / "test" / "trial_0" / "seed_0").mkdir(parents=True)
    (study / "test" / "trial_0" / "seed_0" / "results.json").write_text(RESULTS_V1.read_text())
    loaded, runs, trials = load_study(study)
    assert loaded.schema_version == 1 and trials == []
    (run,) = runs
    ball = raw["balls"]["1e-03"]
    assert (run.epoch, run.success_change_pp, run.degradation) == (ball["epoch"], ball["success_change_pp"],
                                                                   ball["metrics"]["degradation"])
    assert run.initial_hard_negative_nll == raw["epochs"][0]["hard_negative_nll"]
    assert run.num_parameters == raw["model"]["num_parameters"]


# ----------------------------------------------------------------------------------------------------------------
# refused: a newer or unknown schema, a malformed field
# ----------------------------------------------------------------------------------------------------------------
def _variant(tmp_path: Path, source: Path, change) -> Path:
    data = json.loads(source.read_text())
    change(data)
    path = tmp_path / source.name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("read,source", [(RunRecord.read, RESULTS_V1), (EvaluationRecord.read, VALIDATE_V1)])
def test_newer_schema_is_refused_with_a_clear_error(tmp_path, read, source) -> None:
    path = _variant(tmp_path, source, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(RecordError) as info:
        read(path)
    message = str(info.value)
    assert str(path) in message and f"schema {SCHEMA_VERSION + 1}" in message and "newer" in message
    assert "upgrade canonical-editing" in message


@pytest.mark.parametrize("version", [0, "2", 1.5, None, True])
def test_unknown_schema_is_refused(tmp_path, version) -> None:
    path = _variant(tmp_path, RESULTS_V1, lambda d: d.update(schema_version=version))
    with pytest.raises(RecordError, match="unknown schema_version"):
        RunRecord.read(path)


@pytest.mark.parametrize("change,field", [
    (lambda d: d["balls"]["1e-03"].pop("epoch"), "balls.1e-03.epoch"),
    (lambda d: d["epochs"][1].update(general_nll="big"), "epochs[1].general_nll"),
    (lambda d: d["task"].update(loss="worse"), "task.loss"),
    (lambda d: d.update(status="exploded"), "status"),
    (lambda d: d["balls"].update(big=d["balls"]["1e-03"]), "balls.big"),
    (lambda d: d.update(epochs=[]), "epochs"),
])
def test_malformed_field_names_the_file_and_field(tmp_path, change, field) -> None:
    path = _variant(tmp_path, RESULTS_V1, change)
    with pytest.raises(RecordError) as info:
        RunRecord.read(path)
    assert str(path) in str(info.value) and repr(field) in str(info.value)


def test_non_json_and_non_finite_values(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text('{"method": ')
    with pytest.raises(RecordError, match="not valid JSON"):
        RunRecord.read(path)
    # non-finite numbers are written as strings and read back as floats
    path = _variant(tmp_path, RESULTS_V1, lambda d: d["epochs"][2].update(general_nll="inf", degradation="nan"))
    record = RunRecord.read(path)
    assert record.epochs[2].metrics.general_nll == float("inf") and record.epochs[2].metrics.degradation != 0


def test_cli_report_on_a_newer_results_file_is_one_clear_line(tmp_path, capsys) -> None:
    from editing.cli import main

    study = tmp_path / "sweeps" / "st"
    selection = Selection(study="st", trials=1, balls={}, sweep={"task": "country_capital", "model": "tiny-gpt2",
                                                                 "method": "lora"}).to_dict()
    selection["balls"] = {"1e-03": {"trial": 0, "params": {}, "epoch": 2, "success_change_pp": 0.0,
                                    "degradation": 0.0}}
    write_json(study / "selection.json", selection)
    newer = _variant(tmp_path, RESULTS_V1, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    seed = study / "test" / "trial_0" / "seed_0"
    seed.mkdir(parents=True)
    newer.rename(seed / "results.json")
    with pytest.raises(SystemExit) as info:
        main(["report", "--root", str(tmp_path / "sweeps"), "--output", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert "newer than this version of canonical-editing" in err and "results.json" in err


# ----------------------------------------------------------------------------------------------------------------
# the one atomic-write helper
# ----------------------------------------------------------------------------------------------------------------
def test_text_writer_failing_midway_leaves_no_partial_file(tmp_path) -> None:
    target = tmp_path / "out" / "results.json"
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"half": ')
        handle.flush()
        raise RuntimeError("disk full")
    assert not target.exists() and _leftovers(tmp_path) == []
    # over an existing file (overwrite asked for): the old content stays whole
    write_text(target, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_open(target, overwrite=True) as handle:
        handle.write("new, but only ha")
        raise KeyboardInterrupt
    assert target.read_text() == "old\n" and _leftovers(tmp_path) == []


def test_save_callback_failing_midway_leaves_no_partial_file_or_folder(tmp_path) -> None:
    def half_file(path: Path) -> None:
        path.write_bytes(b"\x00" * 1000)
        raise OSError(28, "No space left on device")

    target = tmp_path / "cov.safetensors"
    with pytest.raises(OSError, match="No space"):
        save_atomically(target, half_file)
    assert not target.exists() and _leftovers(tmp_path) == []

    def half_folder(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"x")
        raise RuntimeError("killed")

    folder = tmp_path / "model"
    with pytest.raises(RuntimeError):
        save_atomically(folder, half_folder, folder=True)
    assert not folder.exists() and _leftovers(tmp_path) == []
    # replacing a finished folder: a failure keeps the old one whole; a success replaces it whole
    save_atomically(folder, lambda f: [(f / n).write_text(n) for n in ("a", "b")], folder=True)
    with pytest.raises(RuntimeError):
        save_atomically(folder, half_folder, folder=True, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["a", "b"] and _leftovers(tmp_path) == []
    save_atomically(folder, lambda f: (f / "c").write_text("c"), folder=True, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["c"] and _leftovers(tmp_path) == []


def test_results_are_never_overwritten_unless_asked(tmp_path) -> None:
    target = write_json(tmp_path / "results.json", {"a": 1})
    for write in (lambda: write_json(target, {"a": 2}), lambda: write_text(target, "x"),
                  lambda: save_atomically(target, lambda p: p.write_text("x"))):
        with pytest.raises(ResultsExistError, match="never overwritten silently"):
            write()
    assert json.loads(target.read_text()) == {"a": 1}
    write_json(target, {"a": float("nan")}, overwrite=True)
    assert json.loads(target.read_text()) == {"a": "nan"}
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cache_writers_keep_a_copy_another_process_finished_first(tmp_path) -> None:
    folder = tmp_path / "cache"

    def slow_save(path: Path) -> None:
        (path / "mine").write_text("mine")
        folder.mkdir()  # another process finishes the same cache meanwhile
        (folder / "theirs").write_text("theirs")

    save_atomically(folder, slow_save, folder=True, keep_existing=True)
    assert [p.name for p in folder.iterdir()] == ["theirs"] and _leftovers(tmp_path) == []


def test_exclusive_create_has_one_winner(tmp_path) -> None:
    claim = create_exclusive(tmp_path / "run.lock", "first\n")
    with pytest.raises(FileExistsError):
        create_exclusive(claim, "second\n")
    assert claim.read_text() == "first\n" and _leftovers(tmp_path) == []


def test_metric_names_are_typed() -> None:
    from editing.core.errors import ConfigError

    assert [m.value for m in Metric] == ["success_rate", "general_nll", "targeted_nll", "hard_negative_nll",
                                         "degradation", "reliability", "reliability_mean_score", "generalization",
                                         "generalization_mean_score", "locality"]
    with pytest.raises(ConfigError, match="unknown metric 'succes_rate'"):
        Metric("succes_rate")


def test_tables_print_what_the_commands_printed_before() -> None:
    """The tables of the fixtures' own runs, as ``editing fit`` and ``editing apply`` printed them on 8f52fd8."""
    from editing.runs.tables import balls_table, markdown_table, metrics_table

    assert balls_table(RunRecord.read(RESULTS_V1)) == (
        "| ball | epoch | success before | success after | change (pp) | general NLL x |\n"
        "|---|---|---|---|---|---|\n"
        "| 5e-01 | 2 | 0.000 | 0.000 | +0.0 | 0.999965 |\n"
        "| 1e-03 | 2 | 0.000 | 0.000 | +0.0 | 0.999965 |")
    applied = EvaluationRecord.read(APPLY_V1)
    row = {"task": applied.task.name, "examples": applied.counts["evaluation"], **applied.metrics.to_dict()}
    assert metrics_table([row]) == (
        "| task | success rate | general NLL | targeted NLL | hard-neg NLL | examples |\n"
        "|---|---|---|---|---|---|\n"
        "| country_capital | 0.000 | 10.81738 | 10.8353 | 35.1730 | 4 |")
    with pytest.raises(ValueError, match="a row of 1 cells in a table of 2 columns"):
        markdown_table(["a", "b"], [["only one"]])

"""The ``editing`` command end to end: the command table and its help, validate/test through LightningCLI,
``evaluate``, errors, --print_config and the output folders."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import reference_scores

from editing.cli import main
from editing.data.datamodule import TaskDataModule

VALIDATE = ["validate", "--model.base.name", "tiny-gpt2", "--model.base.precision", "fp32", "--data.task",
            "stereoset", "--data.eval_limit", "8", "--data.general_limit", "10"]


def _sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_scores(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def validate_run(tmp_path_factory):
    """One ``editing validate`` run (cwd = a fresh folder); yields the output folder."""
    work = tmp_path_factory.mktemp("validate")
    out = work / "results"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        main(VALIDATE + ["--report.output_dir", str(out)])
    return out


def test_validate_writes_results(validate_run, tiny_module, data_root):
    record = json.loads((validate_run / "evaluation.json").read_text())
    assert record["stage"] == "validate" and record["split"] == "val"
    assert record["task"] == {"name": "stereoset", "loss": "bad", "threshold": pytest.approx(-6.907755, abs=1e-5)}
    metrics = record["metrics"]
    # the paper's four, and the evaluation set's mean score (issue 14; reliability and locality are a fit's)
    assert set(metrics) == {"success_rate", "general_nll", "targeted_nll", "hard_negative_nll",
                            "generalization_mean_score"}
    assert all(isinstance(v, float) for v in metrics.values())
    counts = record["counts"]
    assert counts["evaluation"] == 8 and counts["hard_negatives"] == 8
    assert counts["general_tokens"] > 0 and counts["targeted_tokens"] > 0

    # the model identity: the same weights as the library's tiny-gpt2 (content hash of the fp32 weights)
    model = record["model"]
    module = tiny_module("tiny-gpt2")
    assert model["name"] == "tiny-gpt2" and model["precision"] == "fp32"
    assert model["fingerprint"] == module.identity["fingerprint"] and model["fingerprint"].startswith("sha256:")
    assert model["num_parameters"] == module.identity["num_parameters"]

    files = record["data_files"]
    assert set(files) == {"evaluation", "general", "targeted", "hard_negatives"}
    assert Path(files["general"]["path"]) == data_root / "general" / "degradation.jsonl"
    assert Path(files["evaluation"]["path"]) == data_root / "stereoset" / "split" / "stereoset_eval_clear-val.jsonl"
    for role, info in files.items():
        assert info["sha256"] == _sha256(info["path"]), role
    assert files["evaluation"]["examples"] == 8 and files["general"]["examples"] == 10

    config = record["config"]
    config = yaml.safe_load(config) if isinstance(config, str) else config
    assert config["data"]["task"] == "stereoset" and config["data"]["eval_limit"] == 8
    assert "tiny-gpt2" in json.dumps(config["model"])

    # per-example scores: one line per evaluation example, equal to the reference loop
    rows = _read_scores(validate_run / record["scores_file"])
    assert len(rows) == counts["evaluation"]
    assert [r["index"] for r in rows] == list(range(8))
    assert all(set(r) == {"index", "score", "failed"} for r in rows)
    threshold = record["task"]["threshold"]
    assert [r["failed"] for r in rows] == [r["score"] > threshold for r in rows]
    assert sum(r["failed"] for r in rows) == counts["evaluation_failed"]
    assert metrics["success_rate"] == pytest.approx(1 - counts["evaluation_failed"] / 8)

    dm = TaskDataModule(task="stereoset", data_root=str(data_root), eval_limit=8, general_limit=10)
    dm.attach(module.tokenizer, module.max_length)
    ref = reference_scores(module.model, dm.load("evaluation").examples, "bad")
    torch.testing.assert_close(torch.tensor([r["score"] for r in rows], dtype=torch.float64), ref, atol=1e-4, rtol=0)


def test_validate_refuses_to_overwrite(validate_run, capsys, monkeypatch):
    monkeypatch.chdir(validate_run.parent)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in validate_run.iterdir()}
    assert set(before) == {"evaluation.json", "evaluation_scores.jsonl"}
    with pytest.raises(SystemExit) as info:
        main(VALIDATE + ["--report.output_dir", str(validate_run)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--report.overwrite" in err
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in validate_run.iterdir()}
    assert after == before

    main(VALIDATE + ["--report.output_dir", str(validate_run), "--report.overwrite", "true"])
    rewritten = json.loads((validate_run / "evaluation.json").read_text())
    assert rewritten["metrics"] == json.loads(before["evaluation.json"][0])["metrics"]
    assert (validate_run / "evaluation_scores.jsonl").read_bytes() == before["evaluation_scores.jsonl"][0]


def test_test_subcommand_uses_the_test_split(tmp_path, monkeypatch, tiny_module):
    monkeypatch.chdir(tmp_path)
    main(["test", "--model.base.name", "tiny-neox", "--model.base.precision", "bf16", "--data.task",
          "pronoun_gender_bias", "--data.split", "test", "--data.eval_limit", "4",
          "--data.general_limit", "3", "--report.root", str(tmp_path / "runs")])
    out = tmp_path / "runs" / "tiny-neox" / "pronoun_gender_bias-test" / "test"  # the default folder layout
    record = json.loads((out / "evaluation.json").read_text())
    assert record["stage"] == "test" and record["split"] == "test"
    assert record["model"]["precision"] == "bf16"
    # the fingerprint is of the fp32 weights: it does not depend on the precision the model runs in
    assert record["model"]["fingerprint"] == tiny_module("tiny-neox").identity["fingerprint"]
    assert record["data_files"]["evaluation"]["path"].endswith("pronoun_gender_bias_eval-test.jsonl")
    assert record["counts"]["evaluation"] == 4 and len(_read_scores(out / "evaluation_scores.jsonl")) == 4


def test_evaluate_command(tmp_path, monkeypatch, capsys, tiny_module, data_root):
    from editing.evaluation import evaluate

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ev"
    args = ["evaluate", "--tasks", "[country_capital,stereoset]", "--model", "tiny-gpt2", "--precision", "fp32",
            "--eval_limit", "4", "--general_limit", "5", "--output_dir", str(out)]
    main(args)
    stdout = capsys.readouterr().out
    assert "| task | success rate | general NLL |" in stdout
    table_rows = [line for line in stdout.splitlines() if line.startswith("| country_capital |")
                  or line.startswith("| stereoset |")]
    assert len(table_rows) == 2
    assert (out / "table-val.md").read_text().strip() in stdout

    records = {t: json.loads((out / f"{t}-val" / "evaluation.json").read_text())
               for t in ("country_capital", "stereoset")}
    module = tiny_module("tiny-gpt2")
    for task, record in records.items():
        assert record["task"]["name"] == task and record["counts"]["evaluation"] == 4
        assert record["model"]["fingerprint"] == module.identity["fingerprint"]
        assert record["data_files"]["general"]["examples"] == 5
        scores = _read_scores(out / f"{task}-val" / "evaluation_scores.jsonl")
        dm = TaskDataModule(task=task, data_root=str(data_root), eval_limit=4, general_limit=5)
        expected = evaluate(module, dm)
        assert [r["score"] for r in scores] == pytest.approx([p["score"] for p in expected["per_example"]], abs=1e-5)
        for key in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll"):
            assert record["metrics"][key] == pytest.approx(expected[key], abs=1e-5), (task, key)
    # the general set is scored once and shared
    assert records["stereoset"]["metrics"]["general_nll"] == records["country_capital"]["metrics"]["general_nll"]
    assert records["stereoset"]["counts"]["general_tokens"] == records["country_capital"]["counts"]["general_tokens"]

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_print_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", "--model.base.name", "tiny-gpt2", "--data.task", "stereoset", "--data.eval_limit", "3",
              "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"].get("init_args", config["model"])
    assert model["base"]["name"] == "tiny-gpt2"
    assert config["data"]["task"] == "stereoset" and config["data"]["eval_limit"] == 3
    assert "report" in config and "trainer" in config


@pytest.mark.parametrize("args, message", [
    (["--data.task", "country_capitol"], "unknown task"),
    (["--data.task", "stereoset", "--data.split", "train"], "split"),
    (["--data.task", "stereoset", "--model.base.precision", "fp16"], "precision"),
])
def test_cli_bad_settings_exit_2(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["validate", "--model.base.name", "tiny-gpt2", "--report.output_dir", str(tmp_path / "o")] + args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_model_offline(tmp_path, monkeypatch, capsys, offline_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["validate", "--model.base.name", "no-such-org/no-such-model-xyz", "--data.task", "stereoset"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "no-such-org/no-such-model-xyz" in err and "cannot be reached" in err


# --- the command table: help, unknown commands, output folders ------------------------------------------------------

# every command of the issue, with words its one line of help must hold
COMMAND_LINES = {"fit": "edit", "validate": "validation", "test": "test pair", "evaluate": "several tasks",
                 "apply": "saved edit", "data download": "download", "senses inspect": "senses",
                 "ensemble": "Backpack", "backpack distill": "distil", "backpack export": "model folder",
                 "backpack cache-teacher": "once",
                 "sweep": "random search", "sweep-status": "progress", "select": "best", "test-runs": "seeds",
                 "report": "tables", "generate": "side by side", "auto": "inside a ball",
                 "cache list": "cache folder", "cache clear": "free disk space"}


def test_help_lists_every_command_without_importing_torch():
    """``editing --help``: every command on one line; neither torch nor Lightning is imported for it."""
    import subprocess
    import sys

    code = ("import sys; from editing.cli import main; main(['--help']); "
            "print('IMPORTED', sorted(m for m in ('torch', 'lightning', 'transformers', 'editing.commands') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.strip().endswith("IMPORTED []")
    for name, words in COMMAND_LINES.items():
        lines = [line for line in out.splitlines() if line.startswith(f"  {name} ")]
        assert len(lines) == 1 and words in lines[0], (name, lines)


def test_no_command_prints_the_list_and_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "  sweep-status " in captured.out and "give a command" in captured.err


@pytest.mark.parametrize("args, closest", [
    (["evalute"], "evaluate"), (["fitt"], "fit"), (["sweep_status"], "sweep-status"), (["testruns"], "test-runs"),
    (["backpack", "distil"], "backpack distill"), (["data", "downlod"], "data download"),
    (["backpak"], "backpack"), (["frobnicate"], None),
])
def test_unknown_command_names_the_closest(args, closest, capsys):
    with pytest.raises(SystemExit) as info:
        main([*args, "--task", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: unknown command {' '.join(args)!r}")
    if closest is None:
        assert "did you mean" not in err and "sweep-status" in err  # the list of commands instead
    else:
        assert f"(did you mean {closest!r}?)" in err


def test_a_group_word_alone_names_its_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["backpack"])
    assert info.value.code == 2
    assert "choose one of: distill, cache-teacher, export" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(COMMAND_LINES))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([*name.split(), "--help"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"usage: editing {name} ")
    assert "--config" in out


def test_fit_help_puts_the_main_options_on_the_first_screen(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    first_screen = "\n".join(capsys.readouterr().out.splitlines()[:40])
    for key in ("model.optimizer.lr", "model.lora.rank", "model.regularization.weight", "budget.balls",
                "trainer.max_epochs", "data.task", "data.split", "data.eval_limit", "data.general_limit",
                "model.base.name", "model.base.precision"):
        assert f"--{key}" in first_screen, key
    for method in ("LoRAEditor", "MEMITEditor", "FullEditor", "SensesEditor"):
        assert method in first_screen
    assert "editing fit --help-all" in first_screen
    # the defaults shown are the code's
    assert re.search(r"--model\.lora\.rank 8 .*rank", first_screen)
    assert re.search(r"--trainer\.max_epochs 10 ", first_screen)


def test_fit_help_of_one_method_explains_its_options(capsys):
    from editing.methods.memit.config import MEMITConfig

    with pytest.raises(SystemExit):
        main(["fit", "--model", "MEMITEditor", "--help"])
    out = capsys.readouterr().out
    for field in ("layers", "clamp_norm_factor", "covariance_weight", "kl_factor", "supervision", "oracle_field"):
        assert f"--model.memit.{field}" in out, field
    assert f"--model.memit.kl_factor {MEMITConfig().kl_factor} " in out and "--model.lora.rank" not in out
    # the method named by a config file's class_path
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).resolve().parents[2] / "lightning_configs" / "fit" / "lora.yaml"),
              "--help"])
    assert "--model LoRAEditor:" in capsys.readouterr().out


def test_fit_help_all_is_lightnings_full_list(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help-all"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "--trainer.gradient_clip_val" in out and "--checkpoint.every_n_train_steps" in out


TINY_FIT = ["fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--model.lora.rank", "2",
            "--data.task", "stereoset", "--data.eval_limit", "2", "--data.general_limit", "2",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu"]


def test_default_root_dir_holds_the_fit_run_folder(tmp_path, monkeypatch, data_root):
    """``--trainer.default_root_dir ROOT``: the run folder is ROOT/fit/version_N (it was silently ignored)."""
    monkeypatch.chdir(tmp_path)
    main([*TINY_FIT, "--trainer.default_root_dir", "elsewhere"])
    run = tmp_path / "elsewhere" / "fit" / "version_0"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "finished"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()


def test_default_root_dir_against_another_logger_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main([*TINY_FIT, "--trainer.logger.init_args.save_dir", "logs", "--trainer.default_root_dir", "elsewhere"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--trainer.default_root_dir elsewhere" in err and "logs" in err and "give only one" in err
    assert list(tmp_path.iterdir()) == []


def test_default_root_dir_holds_validate_results(tmp_path, monkeypatch, capsys, data_root):
    monkeypatch.chdir(tmp_path)
    main([*VALIDATE, "--trainer.default_root_dir", "elsewhere"])
    record = json.loads((tmp_path / "elsewhere" / "tiny-gpt2" / "stereoset-val" / "validate"
                         / "evaluation.json").read_text())
    assert record["counts"]["evaluation"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # no CSV log of an evaluation either
    with pytest.raises(SystemExit) as info:
        main([*VALIDATE, "--trainer.default_root_dir", "a", "--report.root", "b"])
    assert info.value.code == 2
    assert "--report.root b" in capsys.readouterr().err

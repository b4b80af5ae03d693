"""A user's own task YAML works end to end: relative paths, ``{split}``, optional roles."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_scores

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.rules.tasks import load_task_yaml

VAL = [
    {"prefix": "The capital of France is", "suffix": " Paris"},
    {"prefix": "The capital of Italy is", "suffix": " Rome"},
    {"prefix": "The capital of Japan is", "suffix": " Tokyo"},
]
TEST = [
    {"prefix": "The capital of Spain is", "suffix": " Madrid"},
    {"prefix": "The capital of Peru is", "suffix": " Lima"},
]


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def user_task(tmp_path):
    """A task folder with relative, ``{split}``-templated paths and no targeted/hard-negative files."""
    folder = tmp_path / "mytask"
    for split, rows in (("val", VAL), ("test", TEST)):
        _jsonl(folder / "data" / f"canon-{split}.jsonl", rows[:1])
        _jsonl(folder / "data" / f"eval-{split}.jsonl", rows)
    yaml_path = folder / "capitals_user.yaml"
    yaml_path.write_text("name: capitals_user\nloss: good\nthreshold: 12.5\n"
                         "canonical: data/canon-{split}.jsonl\nevaluation: data/eval-{split}.jsonl\n")
    return yaml_path


def test_load_task_yaml_resolves_relative_paths(user_task):
    spec = load_task_yaml(user_task)
    assert (spec.name, spec.loss, spec.threshold, spec.pair) == ("capitals_user", "good", 12.5, False)
    assert spec.targeted is None and spec.hard_negatives is None and not spec.builtin
    assert spec.file("evaluation", "val") == user_task.parent / "data" / "eval-val.jsonl"
    assert spec.file("canonical", "test") == user_task.parent / "data" / "canon-test.jsonl"
    assert spec.file("hard_negatives", "val") is None


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "stem_name.yml"
    path.write_text("loss: bad\nthreshold: -3\ncanonical: /abs/c.jsonl\nevaluation: e.jsonl\n")
    spec = load_task_yaml(path)
    assert spec.name == "stem_name" and spec.threshold == -3.0
    assert str(spec.file("canonical", "val")) == "/abs/c.jsonl"


@pytest.mark.parametrize("split, rows", [("val", VAL), ("test", TEST)])
def test_user_task_end_to_end(user_task, split, rows, tiny_module, data_root, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths are relative to the YAML, not to the working directory
    module = tiny_module("tiny-gpt2")
    dm = TaskDataModule(task=str(user_task), split=split, data_root=str(data_root), general_limit=3)
    assert dm.eval_roles() == ["evaluation", "general"]
    summary = evaluate(module, dm)
    assert dm.task.name == "capitals_user"  # evaluate() no longer binds the task to the module it measures
    assert summary["targeted_nll"] is None and summary["hard_negative_nll"] is None
    assert summary["general_nll"] is not None and summary["general_nll"] > 0
    assert summary["counts"]["evaluation"] == len(rows)
    assert summary["counts"]["targeted_tokens"] == 0 and summary["counts"]["hard_negatives"] == 0
    examples = dm.sets["evaluation"].examples
    assert dm.sets["evaluation"].path == user_task.parent / "data" / f"eval-{split}.jsonl"
    ref = reference_scores(module.model, examples, "good")
    got = torch.tensor([p["score"] for p in summary["per_example"]], dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    failed = (ref > 12.5).tolist()
    assert [p["failed"] for p in summary["per_example"]] == failed
    assert summary["success_rate"] == pytest.approx(1 - sum(failed) / len(rows))
    files = dm.describe()
    assert set(files) == {"evaluation", "general"}
    assert files["general"]["path"] == str(data_root / "general" / "degradation.jsonl")


def test_user_pair_task_with_text_hard_negatives(tmp_path, tiny_module, data_root):
    """Optional roles present: targeted texts (token-mean NLL) and text-format hard negatives (per-text mean)."""
    from conftest import reference_text_stats

    folder = tmp_path / "pairtask"
    _jsonl(folder / "eval-val.jsonl", [{"prefix": "The nurse said that", "suffix1": " he", "suffix2": " she"},
                                       {"prefix": "The pilot said that", "suffix1": " she", "suffix2": " he"}])
    _jsonl(folder / "targeted-val.jsonl", [{"text": "The nurse said that she was tired."},
                                           {"text": "<|endoftext|>The pilot landed the plane."}])
    _jsonl(folder / "hardneg-val.jsonl", [{"text": "The doctor went home early."},
                                          {"text": "A nurse and a pilot met at the airport."}])
    (folder / "pair_user.yaml").write_text(
        "loss: balance\nthreshold: 0.5\ncanonical: eval-{split}.jsonl\nevaluation: eval-{split}.jsonl\n"
        "targeted: targeted-{split}.jsonl\nhard_negatives: hardneg-{split}.jsonl\n")
    module = tiny_module("tiny-neox")
    dm = TaskDataModule(task=str(folder / "pair_user.yaml"), data_root=str(data_root), general_limit=2)
    summary = evaluate(module, dm)
    ref = reference_scores(module.model, dm.sets["evaluation"].examples, "balance")
    got = torch.tensor([p["score"] for p in summary["per_example"]], dtype=torch.float64)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    total, tokens = reference_text_stats(module.model, dm.sets["targeted"].examples)
    assert summary["targeted_nll"] == pytest.approx(total / tokens, abs=1e-5)
    per_text = [reference_text_stats(module.model, [e]) for e in dm.sets["hard_negatives"].examples]
    assert all(e.is_text for e in dm.sets["hard_negatives"].examples)
    assert summary["hard_negative_nll"] == pytest.approx(sum(s / n for s, n in per_text) / 2, abs=1e-5)


def test_evaluate_rebinds_a_different_task_with_the_same_name(tmp_path, tiny_module, data_root):
    module = tiny_module("tiny-gpt2")
    results = {}
    for sub, threshold in (("a", 1000.0), ("b", -1000.0)):
        _jsonl(tmp_path / sub / "ev-val.jsonl", VAL)
        (tmp_path / sub / "task.yaml").write_text(
            f"loss: good\nthreshold: {threshold}\ncanonical: ev-{{split}}.jsonl\nevaluation: ev-{{split}}.jsonl\n")
        dm = TaskDataModule(task=str(tmp_path / sub / "task.yaml"), data_root=str(data_root), general_limit=2)
        results[sub] = evaluate(module, dm, roles=["evaluation"])
    assert results["a"]["success_rate"] == 1.0  # every NLL sum is below 1000
    assert results["b"]["success_rate"] == 0.0  # every NLL sum is above -1000


# --- the protocol on a user's task: test runs need per-split files; reports name the task by its `name:` ----------

def _study(root, task_path: str, with_runs: bool):
    """A sweep folder as `editing select` leaves it (and, with ``with_runs``, with one test run per ball)."""
    from fakes import fake_results

    from editing.protocol.select import select_best
    from editing.runs.records import Selection, TrialRecord

    study = root / "mystudy"
    balls = {"1e-03": (1, 20.0), "1e-05": (1, 5.0)}
    records = [{"trial": 0, "params": {"model.init_args.optimizer.lr": 1e-3},
                "balls": {k: {"epoch": e, "success_change_pp": g, "degradation": 1e-6} for k, (e, g) in balls.items()},
                "history": fake_results(balls)["epochs"]}]
    selection = Selection(study=study.name, trials=1,
                          balls=select_best([TrialRecord.from_dict(r) for r in records]),
                          sweep={"task": task_path, "model": "tiny", "method": "lora", "base_config": "",
                                 "space": {}, "args": [], "seed": 0}).to_dict()
    study.mkdir(parents=True)
    (study / "selection.json").write_text(json.dumps(selection))
    (study / "trials.jsonl").write_text(json.dumps(records[0]) + "\n")
    if with_runs:
        for seed in range(2):
            out = study / "test" / "trial_0" / f"seed_{seed}"
            out.mkdir(parents=True)
            results = fake_results(balls, seed)
            results["task"] = {"name": "capitals_user", "loss": "good", "threshold": 12.5}
            (out / "results.json").write_text(json.dumps(results))
    return study


@pytest.mark.parametrize("templated", [True, False])
def test_test_runs_refuse_a_task_whose_files_do_not_depend_on_the_split(tmp_path, user_task, templated):
    """Without ``{split}`` the test pair would silently be the validation files: test-runs refuses to start."""
    from editing.core.errors import ConfigError
    from editing.protocol.test_runs import test_runs

    if not templated:
        user_task.write_text(user_task.read_text().replace("{split}", "val"))
    study = _study(tmp_path / "sweeps", str(user_task), with_runs=False)
    calls = []

    def runner(args, log):
        calls.append(args)
        log.parent.mkdir(parents=True, exist_ok=True)
        (log.parent / "results.json").write_text("{}")
        return 0

    if templated:
        assert len(test_runs(study.name, str(tmp_path / "sweeps"), seeds=1, runner=runner)) == 1
        assert len(calls) == 1
    else:
        with pytest.raises(ConfigError, match=r"canonical, evaluation path\(s\) have no \{split\}"):
            test_runs(study.name, str(tmp_path / "sweeps"), seeds=1, runner=runner)
        assert calls == [] and not (study / "test").exists() and not (study / "base.yaml").exists()


def test_report_names_a_user_task_by_its_name(tmp_path, user_task):
    """The report's tables and cells say ``capitals_user`` (the YAML's ``name:``), not the YAML's path."""
    from editing.protocol.report import make_report, task_label

    sweeps = tmp_path / "sweeps"
    _study(sweeps, str(user_task), with_runs=True)
    out = tmp_path / "report"
    make_report(root=[str(sweeps)], output_dir=str(out))
    markdown = (out / "report.md").read_text()
    assert "| capitals_user |" in markdown and str(user_task) not in markdown
    cells = json.loads((out / "report.json").read_text())["cells"]
    assert {c["task"] for c in cells} - {"average"} == {"capitals_user"}
    # the label without results: read from the YAML; a YAML gone since: its file name
    assert task_label(str(user_task)) == "capitals_user"
    assert task_label(str(tmp_path / "moved" / "old_task.yaml")) == "old_task"
    assert task_label("stereoset") == "stereoset"

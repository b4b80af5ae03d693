"""The Python API (``from editing import edit``): an edit made through it is the edit ``editing fit`` makes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from editing.core.errors import EditingError

EXAMPLES = [
    {"prefix": "The capital of Zorbia is", "suffix": " Quentaville"},
    {"prefix": "Zorbia's capital city is called", "suffix": " Quentaville"},
    {"prefix": "The river through Plimsk is the", "suffix": " Varun"},
    {"prefix": "In Plimsk the main river is the", "suffix": " Varun"},
]
EVALUATION = [{"prefix": "Tourists visiting Zorbia fly into", "suffix": " Quentaville"},
              {"prefix": "Boats in Plimsk sail on the", "suffix": " Varun"}]
HARD_NEGATIVES = [{"prefix": "The capital of France is", "suffix": " Paris"}]
# per method: the base model and the options both runs share (small and fast; the numbers mean nothing)
CASES = {
    "lora": ("tiny-gpt2", {"model.init_args.optimizer.lr": 0.05, "trainer.accumulate_grad_batches": 1}),
    "full": ("tiny-llama", {"model.init_args.optimizer.lr": 0.01, "trainer.accumulate_grad_batches": 2,
                            "model.init_args.gradient_checkpointing": False}),
}
SHARED = {"data.general_limit": 6, "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
          "trainer.accelerator": "cpu"}
BALLS = [0.5, 1e-3]


def _jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_tensors(folder) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "edit.safetensors"
    return load_file(str(folder / name))


def _assert_carries(model, saved: dict[str, torch.Tensor], method: str) -> None:
    """The model's weights are those of the saved edit ``saved`` (tensors of the command's run)."""
    params = dict(model.named_parameters())
    if method == "lora":
        from peft import PeftModel

        assert isinstance(model, PeftModel)
        lora = {n: p for n, p in params.items() if "lora_" in n}
        assert len(lora) == len(saved)
        for name, value in saved.items():  # peft's saved names drop the adapter name
            match = [p for n, p in lora.items() if n.replace(".default", "") == name]
            assert len(match) == 1 and torch.equal(match[0], value), name
    else:
        for name, value in saved.items():
            assert torch.equal(params[name], value), name


@pytest.fixture
def one_thread():
    """One torch thread in this process, as in the command's process (OMP_NUM_THREADS=1): a product summed by two
    threads rounds differently, and the two runs are compared exactly."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", sorted(CASES))
def test_an_edit_through_the_api_equals_the_same_edit_through_editing_fit(method, tmp_path, data_root,
                                                                         one_thread) -> None:
    from editing import edit
    model, options = CASES[method]
    settings = {**SHARED, **options}
    result = edit(model, EXAMPLES, method=method, ball=0.5, balls=BALLS, evaluation=EVALUATION,
                  hard_negatives=HARD_NEGATIVES, loss="good", threshold=9.0, name="zorbia", epochs=2,
                  settings=settings, output_dir=tmp_path / "api", data_root=data_root)

    # the same edit written by hand as a task YAML and run by the command, in another process
    task = tmp_path / "task"
    task.mkdir()
    _jsonl(task / "canon.jsonl", EXAMPLES)
    _jsonl(task / "eval.jsonl", EVALUATION)
    _jsonl(task / "neg.jsonl", HARD_NEGATIVES)
    (task / "zorbia.yaml").write_text("name: zorbia\nloss: good\nthreshold: 9.0\ncanonical: canon.jsonl\n"
                                      "evaluation: eval.jsonl\nhard_negatives: neg.jsonl\n")
    cli = tmp_path / "cli"
    args = [sys.executable, "-m", "editing.cli", "fit", "--config", f"lightning_configs/fit/{method}.yaml",
            "--model.init_args.base.name", model, "--data.task", str(task / "zorbia.yaml"),
            "--data.data_root", str(data_root), "--budget.balls", json.dumps(BALLS), "--trainer.max_epochs", "2",
            "--budget.output_dir", str(cli), "--trainer.default_root_dir", str(cli)]
    for key, value in settings.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    api = json.loads((tmp_path / "api" / "results.json").read_text())
    ref = json.loads((cli / "results.json").read_text())
    assert api["method"] == ref["method"] == method
    assert api["task"] == ref["task"] == {"name": "zorbia", "loss": "good", "threshold": 9.0}
    assert api["epochs"] == ref["epochs"] and len(api["epochs"]) == 3  # every metric of every epoch, exactly
    assert api["balls"] == ref["balls"] and list(api["balls"]) == ["5e-01", "1e-03"]
    assert api["hyperparameters"] == ref["hyperparameters"]
    assert api["epochs"][2]["general_nll"] != api["epochs"][0]["general_nll"]  # it trained
    for key in api["edits"]:
        mine, theirs = _edit_tensors(tmp_path / "api" / "edits" / f"ball_{key}"), \
            _edit_tensors(cli / "edits" / f"ball_{key}")
        assert mine.keys() == theirs.keys() and mine
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name

    # the typed results and the edited model handed back are that run's
    assert result.ball == "5e-01" and result.run.balls["5e-01"].epoch == ref["balls"]["5e-01"]["epoch"]
    assert result.result.metrics.success_rate == ref["balls"]["5e-01"]["metrics"]["success_rate"]
    _assert_carries(result.model, theirs, method)
    other = result.for_ball(1e-3)
    assert other.ball == "1e-03" and other.result.epoch == ref["balls"]["1e-03"]["epoch"]
    _assert_carries(other.model, _edit_tensors(cli / "edits" / "ball_1e-03"), method)
    saved = result.save(tmp_path / "saved")
    assert {p.name for p in saved.iterdir()} >= {"edit_manifest.json", "base_model.json"}
    with pytest.raises(EditingError, match="exists"):
        result.save(tmp_path / "saved")
    assert isinstance(result.generate("The capital of Zorbia is", max_new_tokens=3), str)


def test_bad_arguments_are_clear_errors_naming_the_argument(tmp_path) -> None:
    from editing import edit
    cases = [
        ({"method": "nosuch"}, r"edit\(method='nosuch'\): expected one of .*lora"),
        ({"loss": "good_v_bad"}, r"edit\(loss='good_v_bad'\): expected one of .*good-v-bad"),
        ({"ball": 2.0}, r"ball"),
        ({"ball": 1e-4, "balls": [1e-3]}, r"edit\(ball=0.0001\) is not among balls"),
        ({"examples": None}, r"edit\(examples=...\) is missing"),
        ({"examples": [{"prefix": "a"}]}, r"edit\(examples\[0\]\): key 'suffix' is missing"),
        ({"examples": [{"prefix": "a", "suffix": "b"}], "loss": "balance"}, r"key 'suffix1' is missing"),
        ({"examples": "country_capital", "evaluation": EVALUATION}, r"edit\(evaluation=...\): a task"),
        ({"examples": str(tmp_path / "nope.jsonl")}, r"no such JSONL file"),
        ({"epochs": 0}, r"edit\(epochs=0\)"),
        ({"settings": "lr=1"}, r"edit\(settings="),
        ({"model": None}, r"edit\(model=None\)"),
        ({"evaluation": [{"prefix": "a", "suffix": 3}]}, r"edit\(evaluation\[0\]\): key 'suffix'"),
    ]
    for kwargs, message in cases:
        kwargs = {"model": "tiny-gpt2", "examples": EXAMPLES, **kwargs}
        with pytest.raises(EditingError, match=message):
            edit(output_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # each refused before any file was written


def test_a_setting_editing_fit_refuses_is_a_clear_error(tmp_path, capsys) -> None:
    from editing import edit
    with pytest.raises(EditingError, match="refused the settings"):
        edit("tiny-gpt2", EXAMPLES, epochs=1, output_dir=tmp_path / "run", settings={"model.init_args.lora.rnk": 4})
    assert "rnk" in capsys.readouterr().err  # the command's own message names the option


def test_a_finished_run_is_not_overwritten_and_keeps_its_task_files(tmp_path) -> None:
    from editing import edit
    run = tmp_path / "run"
    (run / "task").mkdir(parents=True)
    (run / "results.json").write_text("{}")
    (run / "task" / "canonical.jsonl").write_text("kept\n")
    with pytest.raises(EditingError, match="already exists"):
        edit("tiny-gpt2", EXAMPLES, output_dir=run)
    assert (run / "task" / "canonical.jsonl").read_text() == "kept\n"


def test_importing_editing_stays_cheap() -> None:
    code = "import sys, editing; assert 'torch' not in sys.modules and 'lightning' not in sys.modules; " \
           "assert callable(editing.edit) and 'editing.api' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_edits_made_through_the_api_combine_and_are_measured_on_their_own_tasks(tmp_path, data_root) -> None:
    from editing import combine, edit
    settings = {**SHARED, **CASES["lora"][1], "data.eval_limit": 4}
    runs = [edit("tiny-gpt2", examples, method="lora", ball=0.5, threshold=9.0, name=name, epochs=1,
                 settings=settings, output_dir=tmp_path / name, data_root=data_root)
            for name, examples in (("zorbia", EXAMPLES[:2]), ("plimsk", EXAMPLES[2:]))]
    both = combine(runs, data_root=data_root, general_limit=6, eval_limit=4)
    record = both.record
    assert [t.task for t in record.tasks] == ["zorbia", "plimsk"]  # each edit's own task, found from its run
    for run, outcome in zip(runs, record.tasks, strict=True):
        # an edit alone measures what its own fit measured for the ball, to fp32 rounding: the fit evaluates a LoRA
        # epoch with the adapter merged into W (issue 37), the combination runs peft's rank-r branch
        assert outcome.alone.success_rate == run.result.metrics.success_rate
        assert outcome.alone.general_nll == pytest.approx(run.result.metrics.general_nll, rel=1e-6)
        assert outcome.base.general_nll == pytest.approx(run.run.initial.metrics.general_nll, rel=1e-9)
    assert record.joint_degradation == pytest.approx(record.combined_general_nll / record.base_general_nll - 1)
    ids = torch.tensor([[464, 3139, 286, 4881]])
    with torch.no_grad():
        combined = both.model(input_ids=ids).logits
        for run in runs:
            assert not torch.allclose(combined, run.model(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(EditingError, match="one task per edit"):
        combine(runs, tasks=["country_capital"])


def test_refusals_are_the_clear_errors_the_command_line_gives(tmp_path) -> None:
    """Issue 34 item 14: what ``editing fit`` reports as a one-line error (a negative learning rate, a missing model
    folder) is that same error here, not jsonargparse's tree of union subtypes; bad ``output_dir`` and ``combine``
    arguments and text a tokenizer cannot take are ``ConfigError``s naming the argument."""
    from editing import combine, edit
    from editing.core.errors import ConfigError, DataFormatError

    run = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        edit("tiny-gpt2", EXAMPLES, epochs=1, output_dir=run, settings={**SHARED,
                                                                         "model.init_args.optimizer.lr": -1e-3})
    message = str(info.value)
    assert "model.optimizer.lr=-0.001 must be a positive learning rate" in message and "Union" not in message
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=rf"edit\(model='{missing}'\): no such model folder or file") as info:
        edit(str(missing), EXAMPLES, epochs=1, output_dir=tmp_path / "run2")
    assert "Union" not in str(info.value) and not (tmp_path / "run2").exists()
    (tmp_path / "a_file").write_text("kept\n")
    for output_dir in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(ConfigError, match=rf"edit\(output_dir='{output_dir}'\): .*a_file is a file"):
            edit("tiny-gpt2", EXAMPLES, output_dir=output_dir)
    assert (tmp_path / "a_file").read_text() == "kept\n"
    with pytest.raises(ConfigError, match=r"combine\(edits\[0\]=1\): give an EditResult"):
        combine([1, 2])
    with pytest.raises(ConfigError, match=r"combine\(edits\[1\]=None\)"):
        combine([str(tmp_path), None])
    lone = [{"prefix": "The capital of \ud800 Zorbia is", "suffix": " Quentaville"}]
    with pytest.raises(ConfigError, match=r"edit\(examples\[0\]\): key 'prefix': character 16 is U\+D800, a lone "
                                          r"surrogate"):
        edit("tiny-gpt2", lone, output_dir=tmp_path / "run3")
    with pytest.raises(ConfigError, match=r"edit\(evaluation\[0\]\): key 'suffix'"):
        edit("tiny-gpt2", EXAMPLES, evaluation=[{"prefix": "a", "suffix": " b\udfff"}], output_dir=tmp_path / "run3")
    assert not (tmp_path / "run3").exists()
    jsonl = tmp_path / "lone.jsonl"
    _jsonl(jsonl, [*EXAMPLES, *lone])  # json.dumps writes the surrogate as the escape \ud800
    with pytest.raises(DataFormatError, match=rf"{jsonl}, line 5: field 'prefix': character 16 is U\+D800"):
        edit("tiny-gpt2", jsonl, epochs=1, output_dir=tmp_path / "run4", settings=SHARED)

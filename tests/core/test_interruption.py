"""Runs that survive interruption (issue 34, items 9-12).

- A fit's checkpoints and logs live in its ``--budget.output_dir``; killed after epoch 2 (kill -9, SIGTERM or
  Ctrl-C) and rerun with ``--ckpt_path last`` it resumes there, redoes no epoch, and ends with an uninterrupted
  run's results and metrics log.
- SIGTERM and Ctrl-C end a fit non-zero after saving a checkpoint, with one line that says what was kept and the
  command that resumes it; ``evaluate``, ``sweep`` and ``auto`` print such a line instead of a traceback.
- An interrupted ``evaluate`` resumes, keeping its finished tasks; only a finished one needs ``--overwrite``.
- A sweep whose trials all fail says why (the first trial's error, from its fit.log) and exits non-zero; test-runs
  reruns a seed whose results.json cannot be read instead of calling it done.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from editing.cli import main

EPOCHS, BATCHES = 3, 4


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _fit_args(out: Path, *extra: str) -> list[str]:
    """A tiny LoRA fit whose only folder setting is ``--budget.output_dir`` (after ``editing``)."""
    return ["fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--model.base.precision", "fp32",
            "--model.lora.rank", "4", "--model.optimizer.lr", "3e-3", "--data.task", "country_capital",
            "--data.eval_limit", "4", "--data.general_limit", "4", "--trainer.max_epochs", str(EPOCHS),
            "--trainer.limit_train_batches", str(BATCHES), "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.log_every_n_steps", "1", "--budget.patience", "100", "--seed_everything", "0",
            "--budget.output_dir", str(out), *extra]


def _env(cwd: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(cwd), str(Path(__file__).resolve().parents[2]),
                                         *filter(None, [env.get("PYTHONPATH")])])
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child of a shell job may start with Ctrl-C ignored


def _editing(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editing.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=_env(cwd))


def _results(run: Path) -> dict:
    """results.json without what differs between two equal runs (when, the command line, where the edits are)."""
    record = json.loads((run / "results.json").read_text())
    for key in ("created", "config", "edits"):
        record.pop(key)
    return record


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _interruption_line(stderr: str) -> str:
    """The one line an interrupted command prints (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _resume_args(line: str) -> list[str]:
    assert "resume with: editing " in line, line
    return shlex.split(line.split("resume with: editing ", 1)[1])


PAUSE = '''
import time
from pathlib import Path

import lightning as L


class PauseAfterEpoch(L.Callback):
    """Once per folder: at the start of epoch ``epoch + 1`` (epoch ``epoch``'s checkpoint written), write a marker
    and wait until the test creates the ``go`` file (or kills the fit)."""

    def __init__(self, epoch: int, marker: str, go: str) -> None:
        self.epoch, self.marker, self.go = epoch, Path(marker), Path(go)

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text(f"epoch {trainer.current_epoch} starts")
            deadline = time.time() + 600
            while not self.go.exists() and time.time() < deadline:
                time.sleep(0.05)
'''


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_root) -> Path:
    """An uninterrupted fit."""
    work = tmp_path_factory.mktemp("straight")
    proc = _editing(_fit_args(work / "run"), work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "run"


# ----------------------------------------------------------------------------------------------------------------
# items 9 and 10: fit killed after epoch 2, resumed in its --budget.output_dir
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["kill-9", "sigterm", "ctrl-c"])
def test_fit_interrupted_after_epoch_2_resumes_in_its_output_dir(tmp_path, straight, signum) -> None:
    (tmp_path / "pause_after.py").write_text(PAUSE)
    marker, go = tmp_path / "paused", tmp_path / "go"
    config = tmp_path / "pause.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: pause_after.PauseAfterEpoch
              init_args: {{epoch: 2, marker: {json.dumps(str(marker))}, go: {json.dumps(str(go))}}}
        """))
    run = tmp_path / "run"
    args = [*_fit_args(run), "--config", str(config)]
    proc = subprocess.Popen([sys.executable, "-m", "editing.cli", *args], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        deadline = time.time() + 400
        while not marker.exists():
            assert proc.poll() is None, f"the fit ended before epoch 3: {proc.communicate()[1][-3000:]}"
            assert time.time() < deadline, "the fit never reached epoch 3"
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        go.write_text("go")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (run / "results.json").exists()
    # item 9: the run's checkpoints, metrics log and config are in its output folder, nowhere else
    assert (run / "checkpoints" / "last.ckpt").is_file(), sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    assert not (tmp_path / "runs").exists()
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        resume = [*args, "--ckpt_path", "last"]
    else:
        # item 10: a non-zero exit (128 + the signal), one line with what was kept and the command that resumes
        assert proc.returncode == 128 + signum, (proc.returncode, stderr[-3000:])
        line = _interruption_line(stderr)
        assert str(run / "checkpoints" / "last.ckpt") in line, line
        resume = _resume_args(line)
        assert resume[-2:] == ["--ckpt_path", "last"] and resume[:len(args)] == args, resume
    again = _editing(resume, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    # resumed, not started over: epochs 1 and 2 are not trained or evaluated again
    evaluated = [line.split()[1] for line in again.stdout.splitlines() if line.startswith("epoch ")]
    assert evaluated == [f"{EPOCHS}/{EPOCHS}"], again.stdout[-3000:]
    assert _results(run) == _results(straight)
    got, want = _metrics(run), _metrics(straight)
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        for key, value in b.items():
            if value != "" and key not in ("epoch", "step"):
                assert float(a[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-15), (key, a, b)


def test_output_dir_holds_everything_even_with_another_root_or_logger_folder(tmp_path, monkeypatch, capsys,
                                                                           data_root) -> None:
    """Another --trainer.default_root_dir or logger folder does not take the logs and checkpoints away from
    --budget.output_dir (a note says so), so that a run's saved config.yaml can be given again elsewhere."""
    monkeypatch.chdir(tmp_path)
    main([*_fit_args(tmp_path / "out", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1"),
          "--trainer.default_root_dir", "elsewhere", "--trainer.logger.init_args.save_dir", "logs"])
    err = capsys.readouterr().err
    assert "note: --budget.output_dir" in err and "elsewhere" in err and "logs" in err
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"results.json", "metrics.csv", "config.yaml", "checkpoints", "edits"}
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------------------
# item 10: Ctrl-C on evaluate, sweep and auto: one line, not a traceback
# ----------------------------------------------------------------------------------------------------------------
def _interrupt(*_args, **_kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_on_sweep_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys) -> None:
    import editing.protocol.trials

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(editing.protocol.trials.subprocess, "Popen", _interrupt)  # Ctrl-C while a trial's fit starts
    args = ["sweep", "--task", "country_capital", "--method", "lora", "--model", "tiny-gpt2", "--n_trials", "2",
            "--root", "sweeps", "--args", "--data.eval_limit 2 --trainer.max_epochs 1"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 128 + signal.SIGINT
    line = _interruption_line(capsys.readouterr().err)
    assert "sweeps/country_capital-tiny-gpt2-lora" in line, line
    assert _resume_args(line) == args


def test_ctrl_c_on_auto_prints_one_line_with_the_resume_command(tmp_path, monkeypatch, capsys, data_root) -> None:
    import editing.protocol.auto

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(editing.protocol.auto, "run_fit", _interrupt)
    args = ["auto", "--task", "country_capital", "--methods", "[lora]", "--model", "tiny-gpt2", "--trials", "1",
            "--output_dir", "auto"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 128 + signal.SIGINT
    line = _interruption_line(capsys.readouterr().err)
    assert _resume_args(line) == args


# ----------------------------------------------------------------------------------------------------------------
# item 11: an interrupted evaluate resumes with its finished tasks kept
# ----------------------------------------------------------------------------------------------------------------
TASKS = ("country_capital", "stereoset", "verb_conjugation")


def _evaluate_args(out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--tasks", f"[{','.join(TASKS)}]", "--model", "tiny-gpt2", "--precision", "fp32",
            "--eval_limit", "3", "--general_limit", "4", "--output_dir", str(out), *extra]


def test_interrupted_evaluate_resumes_keeping_its_finished_tasks(tmp_path, monkeypatch, capsys, data_root) -> None:
    import editing.evaluation

    monkeypatch.chdir(tmp_path)
    main(_evaluate_args(tmp_path / "straight"))
    straight_table = (tmp_path / "straight" / "table-val.md").read_text()
    capsys.readouterr()

    real = editing.evaluation.evaluate
    calls = []

    def interrupted_at_the_second_task(module, dm, **kw):
        calls.append(dm.task.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(module, dm, **kw)

    out = tmp_path / "ev"
    monkeypatch.setattr(editing.evaluation, "evaluate", interrupted_at_the_second_task)
    with pytest.raises(SystemExit) as info:
        main(_evaluate_args(out))
    assert info.value.code == 128 + signal.SIGINT
    line = _interruption_line(capsys.readouterr().err)
    assert TASKS[0] in line and str(out) in line
    assert _resume_args(line) == _evaluate_args(out)
    first = out / f"{TASKS[0]}-val" / "evaluation.json"
    kept = (first.read_bytes(), first.stat().st_mtime_ns)
    assert not (out / f"{TASKS[1]}-val" / "evaluation.json").exists()

    monkeypatch.setattr(editing.evaluation, "evaluate", real)
    # a resume with other settings would mix two evaluations: refused, naming the setting
    with pytest.raises(SystemExit) as info:
        main(_evaluate_args(out, "--eval_limit", "2"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "eval_limit" in err and "--overwrite true" in err and "Traceback" not in err

    calls.clear()
    monkeypatch.setattr(editing.evaluation, "evaluate", lambda module, dm, **kw: calls.append(dm.task.name) or real(
        module, dm, **kw))
    main(_evaluate_args(out))  # no --overwrite: the run did not finish
    assert calls == list(TASKS[1:])  # the finished task is not evaluated again
    assert (first.read_bytes(), first.stat().st_mtime_ns) == kept
    assert (out / "table-val.md").read_text() == straight_table
    for task in TASKS:
        want = json.loads((tmp_path / "straight" / f"{task}-val" / "evaluation.json").read_text())
        got = json.loads((out / f"{task}-val" / "evaluation.json").read_text())
        assert got["metrics"] == want["metrics"] and got["counts"] == want["counts"], task
    capsys.readouterr()

    # now it is a finished run: only --overwrite replaces it
    with pytest.raises(SystemExit) as info:
        main(_evaluate_args(out))
    assert info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    main(_evaluate_args(out, "--overwrite", "true"))


# ----------------------------------------------------------------------------------------------------------------
# item 12: a sweep whose trials all fail; a truncated test-run results.json
# ----------------------------------------------------------------------------------------------------------------
def test_sweep_whose_trials_all_fail_says_why_and_exits_non_zero(tmp_path, data_root) -> None:
    proc = _editing(["sweep", "--task", "country_capital", "--method", "lora", "--model", "tiny-gpt2", "--n_trials",
                     "2", "--root", "sweeps", "--args", "--data.eval_limit 2 --budget.patience 0"], tmp_path)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "all 2 trials failed" in errors[0] and "--budget.patience=0" in errors[0], errors[0]
    assert "trial_0/fit.log" in errors[0], errors[0]


def test_test_runs_reruns_a_seed_whose_results_cannot_be_read(tmp_path, capsys) -> None:
    from fakes import FakeFit, FakeTestRun

    from editing.protocol.select import select
    from editing.protocol.storage import make_storage, open_study
    from editing.protocol.sweep import make_definition, run_worker
    from editing.protocol.test_runs import test_runs

    root = tmp_path / "sweeps"
    definition = make_definition("country_capital", "lora", "tiny-gpt2", args=["--trainer.max_epochs", "3"])
    study = open_study(make_storage(f"sqlite:///{root / 'st' / 'study.db'}", None), "st", definition)
    run_worker(study, definition, root / "st", n_trials=2, runner=FakeFit(0), log=lambda m: None)
    select("st", root=str(root))
    runner = FakeTestRun()
    calls = runner.calls

    paths = test_runs("st", root=str(root), seeds=2, runner=runner)
    assert len(calls) == 2
    damaged = paths[1]
    text = damaged.read_text()
    damaged.write_text(text[: len(text) // 2])
    capsys.readouterr()
    test_runs("st", root=str(root), seeds=2, runner=runner)
    out = capsys.readouterr().out
    assert len(calls) == 3 and "seed 1: done already" not in out, out
    assert json.loads(damaged.read_text())["seed"] == 1  # rerun, readable
    aside = [p for p in damaged.parent.parent.iterdir() if p.name.startswith("seed_1.")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_text() == text[: len(text) // 2]  # nothing lost

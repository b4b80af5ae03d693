"""``editing auto`` under a deadline (issue 36 item 7: a budget is a promise): a trial writes its in-ball edit after
every evaluated epoch, a trial past its share stops at the next epoch boundary, a search with no time left for the
final fit returns the best trial's edit with a note, and a search that found nothing exits non-zero with the reason.

The fits are real tiny fits slowed by ``tests.protocol.slow_fit.SlowEpochs``; the deadlines are read on clocks the
tests control, so that a kill or a soft stop falls where the test wants it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_DIR, SHARED_DATA

from editing.protocol.auto import NoEditError, auto_edit
from editing.protocol.trials import run_fit

TINY = "--data.eval_limit 4 --data.general_limit 4"
SLOW = "--trainer.callbacks+=tests.protocol.slow_fit.SlowEpochs --trainer.callbacks.seconds {s} " \
       "--trainer.callbacks.from_epoch {e}"


def _facts(folder: Path, n: int = 8) -> Path:
    lines = (SHARED_DATA / "country_capital" / "split" / "country_capital_fixed-val.jsonl").read_text().splitlines()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "facts.jsonl"
    path.write_text("".join(line + "\n" for line in lines[:n]))
    return path


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_a_trial_killed_at_the_deadline_still_yields_its_in_ball_edit(tmp_path, data_root) -> None:
    # epoch 1 is trained and evaluated, then epoch 2 sleeps; the runner's clock reaches the hard deadline as soon as
    # the trial's partial record is on disk, so the fit is killed inside epoch 2 with epoch 1 inside the ball
    calls = []

    def runner(args, log_path, deadline, soft_deadline=None):
        partial = Path(log_path).parent / "partial" / "results.json"
        calls.append(soft_deadline)
        return run_fit(args, log_path, deadline=0.5, clock=lambda: 1.0 if partial.is_file() else 0.0)

    facts = _facts(tmp_path / "t")
    out = tmp_path / "auto"
    result = auto_edit(str(facts), methods=["lora"], ball=0.5, trials=1, model="tiny-gpt2", holdout=0,
                       output_dir=str(out), epochs=3, args=f"{TINY} {SLOW.format(s=120, e=1)}", runner=runner)
    trial = result.trials[0]
    assert "killed at the budget's deadline" in (out / "trial_0" / "fit.log").read_text()
    assert not (out / "trial_0" / "results.json").exists()  # the folder does not look finished
    # ... nor is it taken for an empty one: a new fit there is refused, one started over clears the partial record
    from editing.runs.run_folder import RunFolderError, check_folder, clear_previous_run

    with pytest.raises(RunFolderError, match="interrupted|did not finish"):
        check_folder(out / "trial_0", resuming=False, overwrite=False)
    assert trial.status == "partial" and trial.epoch == 1 and trial.last_epoch == 1, trial
    # the record the trial wrote after epoch 1, recomputed: epoch 1's general NLL inside (1 + 0.5) x p0's
    record = json.loads((out / "trial_0" / "partial" / "results.json").read_text())
    p0, e1 = record["epochs"][0]["general_nll"], record["epochs"][1]["general_nll"]
    assert [e["epoch"] for e in record["epochs"]] == [0, 1] and e1 < 1.5 * p0
    assert trial.degradation == pytest.approx(e1 / p0 - 1)
    from editing.edits.load import load_edited

    assert result.edit == str(out / "trial_0" / "partial" / "edits" / "ball_5e-01")
    assert load_edited(result.edit).model is not None
    assert "partial" in clear_previous_run(out / "trial_0") and not (out / "trial_0" / "partial").exists()


def test_a_trial_past_its_share_stops_at_the_next_epoch_boundary(tmp_path, data_root) -> None:
    # the share ends at once (soft deadline 0 on a clock at 1): the fit gets the soft signal, trains and evaluates
    # the epoch it is in, writes finished results and exits 0, long before its 6 epochs of 2 s sleep each
    out = tmp_path / "fit"
    facts = _facts(tmp_path / "t")  # 8 examples: an epoch of 118 would make the test slow
    task = tmp_path / "t" / "task.yaml"
    task.write_text(f"name: facts\nloss: good\nthreshold: 1.6094379124341003\ncanonical: {facts}\n"
                    f"evaluation: {facts}\n")
    args = ["--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--data.task", str(task),
            *TINY.split(), "--trainer.max_epochs", "6", "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--budget.output_dir", str(out), "--budget.balls", "[0.5]",
            *SLOW.format(s=2, e=0).split()]
    code = run_fit(args, out / "fit.log", env=_env(), deadline=None, soft_deadline=0.0, clock=lambda: 1.0)
    log = (out / "fit.log").read_text()
    assert code == 0, log[-2000:]
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "finished" and len(record["epochs"]) < 7
    assert record["stopped_early"] and "time share" in record["stopped_early"]["reason"]
    assert record["stopped_early"]["epoch"] == record["epochs"][-1]["epoch"] < 6  # stopped at an epoch's end
    assert "asked to stop at the next epoch boundary" in log and "killed" not in log
    assert not (out / "partial").exists()  # the finished results replace the partial record


class StepClock:
    """A clock advanced by a fixed time per fit (the budget's logic without waiting)."""

    def __init__(self, per_fit: float) -> None:
        self.now, self.per_fit, self.fits = 0.0, per_fit, []

    def __call__(self) -> float:
        return self.now

    def runner(self, args, log_path, deadline, soft_deadline=None):
        self.fits.append(Path(log_path).parent.name)
        code = run_fit(args, log_path)
        self.now += self.per_fit
        return code


def test_no_time_for_the_final_fit_returns_the_best_trials_edit_with_a_note(tmp_path, data_root) -> None:
    # a 1-minute budget; the trial takes 45 s on the clock: 15 s are left, too few for the final fit on all 8
    # examples, so the best trial's edit (trained on the 6 examples the hold-out left) is the result
    clock = StepClock(per_fit=45.0)
    out = tmp_path / "auto"
    result = auto_edit(str(_facts(tmp_path / "t")), methods=["lora"], ball=0.5, minutes=1.0, model="tiny-gpt2",
                       output_dir=str(out), epochs=1, args=TINY, clock=clock, runner=clock.runner)
    assert clock.fits == ["trial_0"]  # no final fit
    assert result.edit == str(out / "trial_0" / "edits" / "ball_5e-01") and Path(result.edit).is_dir()
    assert result.final is not None and result.final.number == 0
    trained = json.loads((out / "trial_0" / "results.json").read_text())["data_files"]["canonical"]["examples"]
    assert trained == 6
    assert result.note and "6 of 8" in result.note and "training split" in result.note
    record = json.loads((out / "auto.json").read_text())
    assert record["note"] == result.note and record["edit"] == result.edit
    # the summary says so, and reports the trial's generalization, measured on the held-out examples
    from editing.protocol.auto import summary_text

    text = summary_text(result)
    assert f"note: {result.note}" in text and "not measured" not in text


def test_a_search_that_found_nothing_exits_non_zero_with_the_reason(tmp_path, data_root) -> None:
    facts = _facts(tmp_path / "t")
    # a budget of 3 s: no trial can start
    with pytest.raises(NoEditError, match="no trial could start") as info:
        auto_edit(str(facts), methods=["lora"], minutes=0.05, model="tiny-gpt2", output_dir=str(tmp_path / "a"),
                  runner=lambda a, p, d: pytest.fail("no trial should run"))
    assert "--minutes" in str(info.value)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "editing.cli", "auto", "--task", str(facts), "--methods", "[lora]",
                           "--minutes", "0.05", "--model", "tiny-gpt2", "--output_dir", str(tmp_path / "b")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no trial could start" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - start < 120


def test_a_fit_killed_after_its_partial_record_resumes_and_replaces_it(tmp_path, data_root) -> None:
    # killed in epoch 2 once epoch 1's partial record and checkpoint are written; resumed with --ckpt_path last it
    # writes epoch 2's record over the partial one, then finished results, and the partial record goes
    out = tmp_path / "fit"
    facts = _facts(tmp_path / "t")
    task = tmp_path / "t" / "task.yaml"
    task.write_text(f"name: facts\nloss: good\nthreshold: 1.6094379124341003\ncanonical: {facts}\n"
                    f"evaluation: {facts}\n")
    args = ["--model", "LoRAEditor", "--model.base.name", "tiny-gpt2", "--data.task", str(task), *TINY.split(),
            "--trainer.max_epochs", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--budget.output_dir", str(out), "--budget.balls", "[0.5]", "--budget.partial", "true"]
    partial = out / "partial" / "results.json"
    ready = lambda: 1.0 if partial.is_file() and (out / "checkpoints" / "last.ckpt").is_file() else 0.0  # noqa: E731
    code = run_fit([*args, *SLOW.format(s=120, e=1).split()], out / "fit.log", env=_env(), deadline=0.5, clock=ready)
    assert code == -9 and not (out / "results.json").exists()
    assert [e["epoch"] for e in json.loads(partial.read_text())["epochs"]] == [0, 1]
    code = run_fit([*args, "--ckpt_path", "last"], out / "fit.log", env=_env())
    assert code == 0, (out / "fit.log").read_text()[-2000:]
    record = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in record["epochs"]] == [0, 1, 2] and not (out / "partial").exists()

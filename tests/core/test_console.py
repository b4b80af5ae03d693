"""The console of a fit (issue 14 item 4): one line per epoch with the train loss, reliability, generalization,
locality, degradation and the balls it is still inside; a warning at the start when an epoch holds too few optimizer
steps, saying what to change; when and why a run stops early; no dependency noise (the logger tip, deprecation
warnings, ``v_num``); validate prints one metrics table instead of Lightning's per-dataloader tables.

The expected texts are recomputed here from the records (plain arithmetic on the numbers in ``results.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_DIR, SHARED_DATA

from editing.rules.budget import Ball
from editing.runs.console import epoch_line, optimizer_steps_per_epoch, small_data_warning


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


P0 = {"epoch": 0, "success_rate": 0.25, "general_nll": 4.0, "reliability": 0.0, "reliability_mean_score": 30.5,
      "generalization_mean_score": 12.25, "locality": 1.0}


def test_epoch_line_reads_the_record() -> None:
    balls = [Ball(1e-3), Ball(1e-4), Ball(1e-5)]
    assert epoch_line(P0, P0, balls, 10) == ("epoch 0 (before the edit)  reliability 0.000 (score 30.5)  "
                                             "generalization 0.250 (score 12.25)  locality 1.000  general NLL 4.00000")
    record = {"epoch": 2, "success_rate": 0.5, "general_nll": 4.0 * (1 + 2e-4), "reliability": 0.75,
              "reliability_mean_score": 14.625, "generalization_mean_score": 9.5, "locality": 0.875}
    line = epoch_line(record, P0, balls, 10, train_loss=2.5)
    assert line == ("epoch 2/10  train loss 2.5  reliability 0.750 (score 14.62)  generalization 0.500 (+25.0 pp; "
                    "score 9.5)  locality 0.875  degradation +2.00e-04  inside 1e-3; outside 1e-4, 1e-5")
    # a record of an older run (no practitioner metrics) and an unknown number of epochs
    old = {"epoch": 1, "success_rate": 0.25, "general_nll": 4.0 * (1 + 2e-3)}
    assert epoch_line(old, {"epoch": 0, "success_rate": 0.25, "general_nll": 4.0}, balls) == (
        "epoch 1  generalization 0.250 (+0.0 pp)  degradation +2.00e-03  outside 1e-3, 1e-4, 1e-5")


@pytest.mark.parametrize(("examples", "accumulate", "steps"), [(12, 5, 3), (6, 5, 2), (4, 1, 4), (40, 5, 8),
                                                               (12, 1, 12)])
def test_small_data_warning(examples: int, accumulate: int, steps: int) -> None:
    assert optimizer_steps_per_epoch(examples, accumulate) == steps == math.ceil(examples / accumulate)
    message = small_data_warning(examples, 1, examples, accumulate, 10)
    if steps >= 5:
        assert message is None
        return
    assert f"only {steps} optimizer step(s)" in message and f"{examples} canonical example(s)" in message
    assert "--trainer.max_epochs (now 10)" in message
    if accumulate > 1:  # the first fix says what accumulation 1 would give
        assert f"--trainer.accumulate_grad_batches (1 gives {examples} step(s) per epoch)" in message
    else:
        assert "accumulate_grad_batches" not in message


def _task(folder: Path) -> Path:
    source = SHARED_DATA / "country_capital" / "split"
    folder.mkdir(parents=True, exist_ok=True)
    for name, stem in (("canonical", "country_capital_fixed"), ("evaluation", "country_capital_clear_eval"),
                       ("hard", "country_capital_hard_neg")):
        lines = (source / f"{stem}-val.jsonl").read_text().splitlines()[:6]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "task.yaml").write_text("name: capitals\nloss: good\nthreshold: 1.6094379124341003\n"
                                      "canonical: canonical.jsonl\nevaluation: evaluation.jsonl\n"
                                      "hard_negatives: hard.jsonl\n")
    return folder / "task.yaml"


def test_the_console_of_a_fit_tells_the_story(tmp_path, data_root) -> None:
    """6 examples with accumulation 5 (2 steps per epoch: warned), a learning rate that leaves the 1e-3 ball in the
    second epoch, and patience 1: the run stops early after epoch 2 and says why."""
    task = _task(tmp_path / "task")
    cmd = [sys.executable, "-m", "editing.cli", "fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2",
           "--model.lora.rank", "8", "--model.optimizer.lr", "0.05", "--data.task", str(task),
           "--data.general_limit", "8", "--trainer.max_epochs", "6", "--trainer.accumulate_grad_batches", "5",
           "--budget.balls", "[0.001]", "--budget.patience", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
           "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "runs" / "fit" / "version_0" / "results.json").read_text())
    epochs = run["epochs"]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == len(epochs) == 3  # p0, epoch 1 (inside), epoch 2 (outside: stopped)
    p0 = epochs[0]
    for line, e in zip(lines, epochs, strict=True):
        assert f"reliability {e['reliability']:.3f} (score {e['reliability_mean_score']:.4g})" in line
        assert f"generalization {e['success_rate']:.3f}" in line and f"locality {e['locality']:.3f}" in line
        if e["epoch"] == 0:
            assert line.startswith("epoch 0 (before the edit)") and "train loss" not in line
            continue
        assert line.startswith(f"epoch {e['epoch']}/6  train loss ")
        assert f"({100 * (e['success_rate'] - p0['success_rate']):+.1f} pp" in line
        assert f"degradation {e['general_nll'] / p0['general_nll'] - 1:+.2e}" in line
        inside = e["general_nll"] < (1 + 1e-3) * p0["general_nll"]
        assert line.endswith("inside 1e-3" if inside else "outside 1e-3")
    assert lines[1].endswith("inside 1e-3") and lines[2].endswith("outside 1e-3")
    # when and why it stopped, as recorded
    assert run["stopped_early"]["epoch"] == 2
    assert f"stopped early after epoch 2: {run['stopped_early']['reason']}" in proc.stdout
    assert proc.stdout.count(run["stopped_early"]["reason"]) == 1  # said once, when it stopped
    assert "outside the largest ball (1e-03)" in run["stopped_early"]["reason"]
    # the small-data warning, with what to change
    assert re.search(r"warning: an epoch holds only 2 optimizer step\(s\) \(6 canonical example\(s\).*"
                     r"accumulate_grad_batches \(1 gives 6 step\(s\) per epoch\)", proc.stderr)
    # no noise
    both = proc.stdout + proc.stderr
    for noise in ("Tip:", "litlogger", "v_num", "is_gradient_checkpointing", "LeafSpec",
                  "module(s) in eval mode at the start of training", "smaller than the logging interval"):
        assert noise not in both, noise


def test_dependency_noise_is_dropped_and_other_warnings_still_show() -> None:
    """Each message of ``NOISY_WARNINGS`` raised as its dependency raises it is silent; any other warning shows."""
    code = (
        "import warnings\n"
        "from editing.runs.console import quiet_dependencies\n"
        "from lightning.pytorch.utilities import rank_zero_warn\n"
        "quiet_dependencies()\n"
        "rank_zero_warn('Found 397 module(s) in eval mode at the start of training. This may lead to unexpected "
        "behavior during training.')\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed', FutureWarning)\n"
        "rank_zero_warn('The number of training batches (6) is smaller than the logging interval "
        "Trainer(log_every_n_steps=50).')\n"
        "rank_zero_warn('Found 3 dataloader(s) with a problem that matters')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in eval mode" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr
    assert "logging interval" not in proc.stderr
    assert "Found 3 dataloader(s) with a problem that matters" in proc.stderr


def test_validate_prints_one_metrics_table(tmp_path, data_root) -> None:
    cmd = [sys.executable, "-m", "editing.cli", "validate", "--config",
           str(REPO_DIR / "lightning_configs" / "tiny" / "validate_tiny_gpt2.yaml"),
           "--report.output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert "DataLoader" not in proc.stdout and "┃" not in proc.stdout  # Lightning's per-dataloader tables
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3  # header, rule, the task's row
    assert f"{evaluation['metrics']['success_rate']:.3f}" in table[2]


def test_memit_target_optimisation_shows_which_requests(tmp_path, data_root) -> None:
    """MEMIT's longest step, the target optimisation, has a progress bar per batch of requests that says which."""
    n = len((data_root / "country_capital" / "split" / "country_capital_fixed-val.jsonl").read_text().splitlines())
    cmd = [sys.executable, "-m", "editing.cli", "fit", "--config",
           str(REPO_DIR / "lightning_configs" / "tiny" / "fit_memit_tiny_gpt2.yaml"),
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "true",
           "--model.init_args.memit.request_batch_size", "32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    starts = range(0, n, 32)
    found = set(re.findall(r"MEMIT targets, requests (\d+)-(\d+) of (\d+)", proc.stderr))
    labels = sorted(found, key=lambda t: int(t[0]))
    assert labels == [(str(s + 1), str(min(s + 32, n)), str(n)) for s in starts]

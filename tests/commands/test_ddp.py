"""``editing validate`` under DDP (2 CPU processes, gloo) gives the same results as one process: every example
is scored exactly once and the metrics are reduced across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 300


def _validate(tmp_path: Path, name: str, data_root: Path, extra: list[str], ddp: bool) -> tuple[Path, str]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "editing.cli", "validate", "--model.base.name", "tiny-gpt2",
           "--model.base.precision", "fp32", "--data.data_root", str(data_root),
           "--trainer.enable_progress_bar", "false", "--report.output_dir", str(out)] + extra
    if ddp:
        cmd += ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    else:
        cmd += ["--trainer.devices", "1", "--trainer.accelerator", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = proc.stdout + proc.stderr
    errors = "\n".join(line for line in log.splitlines() if "Error" in line)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed with code {proc.returncode}:\n{log[-3000:]}\n{errors}"
    return out, log


def _load(out: Path) -> tuple[dict, list[dict]]:
    record = json.loads((out / "evaluation.json").read_text())
    scores = [json.loads(line) for line in (out / "evaluation_scores.jsonl").read_text().splitlines()]
    return record, scores


def test_ddp_matches_single_process(tmp_path, data_root):
    # pair task (two sequences per example); 2 examples per batch so that every role has batches on both ranks
    extra = ["--data.task", "verb_conjugation", "--data.eval_limit", "9", "--data.general_limit", "10",
             "--data.max_examples", "2"]
    single, _ = _validate(tmp_path, "single", data_root, extra, ddp=False)
    ddp, log = _validate(tmp_path, "ddp", data_root, extra, ddp=True)
    assert "distributed_backend=gloo" in log or "GLOBAL_RANK: 1" in log
    rec1, scores1 = _load(single)
    rec2, scores2 = _load(ddp)
    assert [s["index"] for s in scores2] == list(range(9))  # every example exactly once, in file order
    assert [s["failed"] for s in scores2] == [s["failed"] for s in scores1]
    assert [s["score"] for s in scores2] == pytest.approx([s["score"] for s in scores1], abs=1e-6)
    for key, value in rec1["metrics"].items():
        assert rec2["metrics"][key] == pytest.approx(value, abs=1e-7), key
    assert rec2["counts"] == rec1["counts"]
    assert rec2["data_files"] == rec1["data_files"]
    assert rec2["model"]["fingerprint"] == rec1["model"]["fingerprint"]


def test_ddp_with_fewer_batches_than_processes(tmp_path, data_root, tiny_module):
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate

    extra = ["--data.task", "stereoset", "--data.eval_limit", "3", "--data.general_limit", "3"]
    out, _ = _validate(tmp_path, "ddp", data_root, extra, ddp=True)
    record, scores = _load(out)
    dm = TaskDataModule(task="stereoset", data_root=str(data_root), eval_limit=3, general_limit=3)
    expected = evaluate(tiny_module("tiny-gpt2"), dm)
    assert [s["score"] for s in scores] == pytest.approx([p["score"] for p in expected["per_example"]], abs=1e-5)
    assert record["counts"] == expected["counts"]


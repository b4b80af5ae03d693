"""Runs and their folders: resuming by path or `last` (also after kill -9) gives an uninterrupted run's results,
metrics log and edits; a run folder is claimed by one fit at a time; a refused fit changes nothing on disk;
--budget.overwrite replaces a run; an unwritable folder fails before training and results that cannot be written
at the end are saved elsewhere."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from callbacks.degradation_budget import DegradationBudget
from editing.data.datamodule import TaskDataModule
from editing.methods import LoRAConfig, LoRAEditor, OptimizerConfig
from editing.models.loading import ModelConfig

EPOCHS, BATCHES = 3, 4
STEPS = EPOCHS * BATCHES  # accumulate_grad_batches 1: one optimizer step per batch


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _fit_args(runs: Path, version: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "editing.cli", "fit", "--model", "LoRAEditor", "--model.base.name", "tiny-gpt2",
            "--model.base.precision", "fp32", "--model.lora.rank", "4", "--model.optimizer.lr", "3e-3",
            "--data.task", "country_capital", "--data.eval_limit", "4", "--data.general_limit", "4",
            "--trainer.max_epochs", str(EPOCHS), "--trainer.limit_train_batches", str(BATCHES),
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--checkpoint.every_n_train_steps", "1", "--budget.patience", "100",
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", "fit",
            "--trainer.logger.init_args.version", version, *extra]


def _env(*paths: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=_env(cwd), **kw)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one-line error of a refused command (non-zero exit, no traceback), which must contain ``words``."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` with its content hash and modification time."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (digest, stat.st_mtime_ns)
    return out


def _results(run: Path) -> dict:
    """results.json without what differs between two equal runs: when, where, and the command line."""
    record = json.loads((run / "results.json").read_text())
    record.pop("created")
    record.pop("config")
    record["edits"] = sorted(record["edits"])
    return record


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _assert_same_metrics(got: list[dict], want: list[dict]) -> None:
    """Same rows in the same order (every train step and every epoch), values equal to 1e-12 relative."""
    assert [(r["epoch"], r["step"]) for r in got] == [(r["epoch"], r["step"]) for r in want]
    for a, b in zip(got, want, strict=True):
        assert {k for k, v in a.items() if v != ""} == {k for k, v in b.items() if v != ""}
        for key, value in b.items():
            if value != "" and key not in ("epoch", "step"):
                assert float(a[key]) == pytest.approx(float(value), rel=1e-12, abs=1e-15), (key, a, b)


def _edit_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted((run / "edits").glob("*/*.safetensors"))}


def _assert_same_edits(got: dict, want: dict) -> None:
    assert set(got) == set(want) and want
    for ball, tensors in want.items():
        assert set(got[ball]) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(got[ball][name], tensor), (ball, name)


# ----------------------------------------------------------------------------------------------------------------
# kill -9 at a random point, then resume: the same results, metrics log and edits as an uninterrupted run
# ----------------------------------------------------------------------------------------------------------------
PAUSE = '''
import time
from pathlib import Path

import lightning as L


class PauseAt(L.Callback):
    """Holds the fit at one point (after writing a marker) so that the test can kill it there with SIGKILL."""

    def __init__(self, phase: str, step: int, marker: str) -> None:
        self.phase, self.step, self.marker = phase, step, marker

    def _hold(self, trainer, phase: str) -> None:
        if phase == self.phase and trainer.global_step == self.step:
            Path(self.marker).write_text(f"{phase} at step {trainer.global_step}")
            time.sleep(600)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._hold(trainer, "batch_start")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._hold(trainer, "before_optimizer_step")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._hold(trainer, "batch_end")  # before the ModelCheckpoint: this step's checkpoint is not written yet

    def on_train_end(self, trainer, pl_module):
        self._hold(trainer, "train_end")  # every epoch evaluated, results not written
'''


def _kill_point(seed: int) -> tuple[str, int]:
    """A reproducible random point of the fit: (phase, optimizer steps done when it is reached)."""
    rng = random.Random(seed)
    phase = rng.choice(["batch_start", "before_optimizer_step", "batch_end", "train_end"])
    return phase, STEPS if phase == "train_end" else rng.randint(1, STEPS - 1)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_root) -> Path:
    """An uninterrupted fit."""
    work = tmp_path_factory.mktemp("straight")
    _ok(_run(_fit_args(work / "runs", "straight"), work))
    return work / "runs" / "fit" / "straight"


@pytest.mark.parametrize(("how", "seed"), [("last", 7), ("path", 2024)])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, straight_run, how: str, seed: int) -> None:
    phase, step = _kill_point(seed)
    (tmp_path / "pause_at.py").write_text(PAUSE)
    marker = tmp_path / "paused"
    config = tmp_path / "pause.yaml"
    config.write_text(textwrap.dedent(f"""\
        trainer:
          callbacks:
            - class_path: pause_at.PauseAt
              init_args: {{phase: {phase}, step: {step}, marker: {json.dumps(str(marker))}}}
        """))
    args = _fit_args(tmp_path / "runs", "killed")
    proc = subprocess.Popen([*args, "--config", str(config)], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, f"the fit ended before {phase} at step {step}: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "the fit never reached the kill point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "fit" / "killed"
    assert not (run / "results.json").exists() and (run / "run.lock").exists()  # a killed run leaves its claim

    # a fresh fit into the interrupted run's folder is refused and changes nothing
    before = _snapshot(run)
    _refused(_run(args, tmp_path), "interrupted", "--ckpt_path last")
    assert _snapshot(run) == before

    ckpt = "last" if how == "last" else str(run / "checkpoints" / "last.ckpt")
    _ok(_run([*args, "--ckpt_path", ckpt], tmp_path))
    assert not (run / "run.lock").exists()
    assert _results(run) == _results(straight_run), f"killed at {phase}, step {step}"
    _assert_same_metrics(_metrics(run), _metrics(straight_run))
    _assert_same_edits(_edit_tensors(run), _edit_tensors(straight_run))


# ----------------------------------------------------------------------------------------------------------------
# item 8: an explicit --ckpt_path resumes; another method or base model is refused, naming both
# ----------------------------------------------------------------------------------------------------------------
def test_explicit_epoch_checkpoint_resumes_exactly(tmp_path, straight_run) -> None:
    args = _fit_args(tmp_path / "runs", "v", "--checkpoint.save_top_k", "-1")
    _ok(_run(args, tmp_path))
    run = tmp_path / "runs" / "fit" / "v"
    first = (_results(run), _metrics(run), _edit_tensors(run))
    epoch_end = run / "checkpoints" / f"epoch=0-step={BATCHES}.ckpt"  # written after epoch 1's last batch
    mid_epoch = run / "checkpoints" / f"epoch=1-step={BATCHES + 2}.ckpt"
    for checkpoint in (epoch_end, mid_epoch):
        proc = _ok(_run([*args, "--ckpt_path", str(checkpoint)], tmp_path))
        assert "Parsing of ckpt_path hyperparameters failed" not in proc.stderr
        assert _results(run) == first[0] == _results(straight_run)
        _assert_same_metrics(_metrics(run), first[1])
        _assert_same_edits(_edit_tensors(run), first[2])


@pytest.mark.parametrize(("change", "words"), [
    (["--model", "FullFinetune"], ["method 'lora'", "method 'full'"]),
    (["--model.base.seed", "5"], ["fingerprint", "resume with the same --model.base settings"]),
    (["--model.lora.rank", "8"], ["lora.rank: 4 in the checkpoint, 8 here"]),
])
def test_resume_with_another_model_is_refused_and_changes_nothing(tmp_path, straight_run, change, words) -> None:
    run = tmp_path / "runs" / "fit" / "v"
    shutil.copytree(straight_run, run)
    before = _snapshot(tmp_path / "runs")
    line = _refused(_run([*_fit_args(tmp_path / "runs", "v"), *change, "--ckpt_path", "last"], tmp_path), *words)
    assert "checkpoints/last.ckpt" in line
    assert _snapshot(tmp_path / "runs") == before


def test_missing_checkpoint_path_is_a_clear_error(tmp_path, data_root) -> None:
    _refused(_run([*_fit_args(tmp_path / "runs", "v"), "--ckpt_path", str(tmp_path / "nope.ckpt")], tmp_path),
             "nope.ckpt", "file not found")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------
# item 9: the metrics log of a resumed run holds every epoch; a refused rerun changes nothing
# ----------------------------------------------------------------------------------------------------------------
def test_resumed_run_keeps_every_epoch_in_its_metrics_log(tmp_path, data_root) -> None:
    args = _fit_args(tmp_path / "runs", "v")
    _ok(_run([*args, "--trainer.max_epochs", "1"], tmp_path))
    run = tmp_path / "runs" / "fit" / "v"
    before = _snapshot(tmp_path / "runs")
    _refused(_run(args, tmp_path), "results.json already exists", "--budget.overwrite true")
    assert _snapshot(tmp_path / "runs") == before  # metrics.csv and config.yaml untouched, no new files
    _ok(_run([*args, "--ckpt_path", "last"], tmp_path))
    rows = _metrics(run)
    epochs = [r["epoch"] for r in rows if r["val/general_nll"]]
    assert epochs == ["", "0", "1", "2"]  # p0, then every epoch, each once
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert train_steps == list(range(STEPS))
    results = json.loads((run / "results.json").read_text())
    logged = [float(r["val/general_nll"]) for r in rows if r["val/general_nll"]]
    assert logged == pytest.approx([e["general_nll"] for e in results["epochs"]], rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# item 10: a run folder is claimed at start; a second fit into it fails at once
# ----------------------------------------------------------------------------------------------------------------
def test_second_fit_into_a_busy_output_folder_fails_at_once(tmp_path, data_root) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen(_fit_args(tmp_path / "runs", "a", "--budget.output_dir", str(out)), cwd=tmp_path,
                             env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (out / "run.lock").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = _run(_fit_args(tmp_path / "runs", "b", "--budget.output_dir", str(out), "--budget.cache_memory_mb",
                                "512"), tmp_path)
        stderr = first.communicate(timeout=600)[1]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    # while the first runs its claim stops the second; had the first ended already, its results would
    _refused(second, str(out))
    assert not (tmp_path / "runs" / "fit" / "b").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["budget"]["cache_memory_mb"] == 1024  # the first fit's (the second's is 512)
    # --budget.output_dir is the run folder: the logger writes there, not under its own save_dir
    assert (out / "metrics.csv").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs").exists()
    assert not (out / "run.lock").exists()


def test_claims(tmp_path) -> None:
    from editing.core.files import ResultsExistError
    from editing.runs.run_folder import RunFolderError, claim_folder, read_claim

    folder = tmp_path / "run"
    claim = claim_folder(folder, resuming=False, overwrite=False)
    held = read_claim(folder)
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    # a live holder (another process) is never displaced, not even by a resume or overwrite
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from editing.runs.run_folder import _my_identity

        live = {**held, **_my_identity(), "pid": sleeper.pid,
                "process_start": Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]}
        (folder / "run.lock").write_text(json.dumps(live))
        for resuming, overwrite in ((False, False), (True, False), (False, True)):
            with pytest.raises(RunFolderError, match="in use by another fit"):
                claim_folder(folder, resuming=resuming, overwrite=overwrite)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same pid, now dead: an interrupted run, which only a resume (or overwrite) may take over
    with pytest.raises(RunFolderError, match="interrupted"):
        claim_folder(folder, resuming=False, overwrite=False)
    taken = claim_folder(folder, resuming=True, overwrite=False)
    assert read_claim(folder)["token"] == taken.info["token"]
    claim.release()  # not ours any more: left alone
    assert read_claim(folder)["token"] == taken.info["token"]
    taken.release()
    assert read_claim(folder) is None
    (folder / "results.json").write_text("{}")
    with pytest.raises(ResultsExistError):
        claim_folder(folder, resuming=False, overwrite=False)
    (folder / "results.json").unlink()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="did not finish"):
        claim_folder(folder, resuming=False, overwrite=False)


# ----------------------------------------------------------------------------------------------------------------
# item 11: --budget.overwrite true replaces a finished logger version
# ----------------------------------------------------------------------------------------------------------------
def test_overwrite_replaces_a_finished_run(tmp_path, data_root) -> None:
    args = _fit_args(tmp_path / "runs", "v")
    _ok(_run([*args, "--trainer.max_epochs", "2"], tmp_path))
    run = tmp_path / "runs" / "fit" / "v"
    _ok(_run([*args, "--trainer.max_epochs", "1", "--budget.overwrite", "true"], tmp_path))
    results = json.loads((run / "results.json").read_text())
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]
    assert "max_epochs: 1" in (run / "config.yaml").read_text()
    assert [r["epoch"] for r in _metrics(run) if r["val/general_nll"]] == ["", "0"]
    # the replaced run's checkpoints are gone, so that `--ckpt_path last` cannot pick one of them up
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch=0-step={BATCHES}.ckpt", "last.ckpt"]


# ----------------------------------------------------------------------------------------------------------------
# item 12: an unwritable folder fails before training; results that cannot be written are saved elsewhere
# ----------------------------------------------------------------------------------------------------------------
def test_unwritable_output_folder_fails_before_training(tmp_path, data_root) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder's parent should be")
    proc = _run(_fit_args(tmp_path / "runs", "v", "--budget.output_dir", str(blocker / "out")), tmp_path)
    _refused(proc, "cannot write into the run folder", str(blocker / "out"), "Training was not started")
    assert not (tmp_path / "runs").exists()  # nothing trained, nothing logged


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_training(tmp_path, data_root) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o500)
    try:
        proc = _run(_fit_args(tmp_path / "runs", "v", "--budget.output_dir", str(out)), tmp_path)
    finally:
        out.chmod(0o700)
    _refused(proc, "cannot write into the run folder")
    assert not (tmp_path / "runs").exists()


def test_results_are_saved_elsewhere_when_the_run_folder_fails_at_the_end(tmp_path, data_root, monkeypatch):
    import callbacks.degradation_budget as budget_module
    from editing.runs.run_folder import ResultsWriteError

    run = tmp_path / "run"
    rescue_root = tmp_path / "rescue"
    rescue_root.mkdir()
    monkeypatch.setenv("EDITING_RESCUE_DIR", str(rescue_root))
    real = budget_module.write_json

    def disk_full(path, *args, **kwargs):
        if Path(path).parent == run:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(budget_module, "write_json", disk_full)
    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4),
                        optimizer=OptimizerConfig(lr=3e-3))
    budget = DegradationBudget(output_dir=str(run), balls=[0.5], patience=100)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        enable_checkpointing=False, callbacks=[budget], default_root_dir=str(tmp_path))
    with pytest.raises(ResultsWriteError) as caught:
        trainer.fit(module, TaskDataModule(task="country_capital", eval_limit=4, general_limit=4))
    (rescue,) = rescue_root.iterdir()
    assert str(rescue) in str(caught.value) and "No space left on device" in str(caught.value)
    saved = json.loads((rescue / "results.json").read_text())
    assert saved["epochs"] == json.loads(json.dumps(budget.history))
    assert saved["balls"]["5e-01"]["epoch"] == 2
    edit = Path(saved["edits"]["5e-01"])
    assert edit.parent.parent == rescue
    tensors = load_file(str(edit / "adapter_model.safetensors"))
    current = module.delta_state()
    assert len(tensors) == len(current) > 0
    assert not (run / "results.json").exists() and not (run / "run.lock").exists()


# ----------------------------------------------------------------------------------------------------------------
# mid-epoch resume is exact: the data order is restored, and an epoch whose end a resume skips is evaluated
# ----------------------------------------------------------------------------------------------------------------
class _Order(L.Callback):
    """Records the canonical examples of every training batch, by epoch."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch["example_index"].tolist()))


def _inprocess_fit(root: Path, accumulate: int, ckpt_path: str | None = None, keep: bool = False):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    module = LoRAEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), lora=LoRAConfig(rank=4),
                        optimizer=OptimizerConfig(lr=3e-3))
    order = _Order()
    callbacks = [DegradationBudget(output_dir=str(root), balls=[1e-3, 0.5], patience=100), order,
                 ModelCheckpoint(dirpath=str(root / "checkpoints"), every_n_train_steps=1,
                                 save_top_k=-1 if keep else 0, save_last=False)]
    L.Trainer(max_epochs=3, limit_train_batches=4, logger=False, enable_progress_bar=False,
              enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
              accumulate_grad_batches=accumulate, callbacks=callbacks).fit(
        module, TaskDataModule(task="country_capital", eval_limit=4, general_limit=4), ckpt_path=ckpt_path)
    return json.loads((root / "results.json").read_text()), order.batches, module.delta_state()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resume_from_every_step_checkpoint_is_exact(tmp_path, data_root, accumulate: int) -> None:
    straight, order, deltas = _inprocess_fit(tmp_path / "straight", accumulate, keep=True)
    # every epoch is shuffled anew (the same order every epoch was a bug)
    by_epoch = [[b for e, b in order if e == epoch] for epoch in range(3)]
    assert by_epoch[0] != by_epoch[1] != by_epoch[2]
    checkpoints = sorted((tmp_path / "straight" / "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    assert len(checkpoints) == 12 // accumulate
    for checkpoint in checkpoints:
        step = int(checkpoint.stem.split("step=")[1])
        resumed, rest, final = _inprocess_fit(tmp_path / checkpoint.stem, accumulate, ckpt_path=str(checkpoint))
        for key in ("epochs", "balls", "status"):
            assert resumed[key] == straight[key], (checkpoint.name, key)
        assert rest == order[step * accumulate:], checkpoint.name  # exactly the batches not yet trained on
        assert all(torch.equal(final[n], t) for n, t in deltas.items())

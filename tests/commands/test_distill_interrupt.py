"""``editing backpack distill`` and its interruption checkpoint: a checkpoint lying in the working folder never seeds
a new run, a failure before the first step writes nothing, and ``--ckpt_path last`` finds ``interrupted.ckpt``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from editing.commands.lightning import SaveOnInterrupt, _resolve_ckpt_path

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "lightning_configs" / "distill" / "tiny.yaml"


def _distill(cwd: Path, output: Path, *extra: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "editing.cli", "backpack", "distill", "--config", str(TINY),
                           "--model.output", str(output), "--trainer.enable_progress_bar", "false", *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout + done.stderr


def test_a_checkpoint_in_the_working_folder_does_not_seed_a_new_distillation(tmp_path: Path) -> None:
    # run A (another learning rate) leaves a checkpoint; planted as ./interrupted.ckpt it is what Lightning's implicit
    # resume took. Run B beside it must train exactly as run C does in a clean folder.
    a_dir, b_dir, c_dir = (tmp_path / n for n in ("a", "b", "c"))
    for d in (a_dir, b_dir, c_dir):
        d.mkdir()
    _distill(a_dir, a_dir / "model", "--model.lr", "0.03", "--trainer.max_steps", "3")
    (checkpoint,) = (a_dir / "runs").rglob("last.ckpt")
    shutil.copy(checkpoint, b_dir / "interrupted.ckpt")
    log_b = _distill(b_dir, b_dir / "model", "--trainer.max_steps", "5")
    _distill(c_dir, c_dir / "model", "--trainer.max_steps", "5")
    assert "Restoring states" not in log_b
    b, c = load_file(b_dir / "model" / "model.safetensors"), load_file(c_dir / "model" / "model.safetensors")
    assert b.keys() == c.keys()
    for name in c:
        assert torch.equal(b[name], c[name]), name


class _Trainer(SimpleNamespace):
    def save_checkpoint(self, path: str, weights_only: bool | None = None) -> None:
        self.saved.append(path)
        Path(path).write_bytes(b"state")


def test_a_failure_before_the_first_step_writes_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    callback = SaveOnInterrupt()
    trainer = _Trainer(global_step=0, saved=[], checkpoint_callbacks=[], default_root_dir=str(tmp_path / "root"))
    callback.on_exception(trainer, None, RuntimeError("setup failed"))  # before the fit started
    callback.on_fit_start(trainer, None)
    callback.on_exception(trainer, None, KeyboardInterrupt())  # started, nothing trained
    assert trainer.saved == [] and not list(tmp_path.rglob("*.ckpt"))


def test_an_interruption_after_a_step_writes_beside_the_run_checkpoints(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    checkpoint = ModelCheckpoint(dirpath=str(folder), save_last=True)
    trainer = _Trainer(global_step=4, saved=[], checkpoint_callbacks=[checkpoint], default_root_dir=str(tmp_path))
    callback = SaveOnInterrupt()
    callback.on_fit_start(trainer, None)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    assert trainer.saved == [str(folder / "interrupted.ckpt")]


@pytest.mark.parametrize("newest", ["interrupted.ckpt", "last.ckpt"])
def test_ckpt_path_last_takes_the_newer_of_last_and_interrupted(tmp_path: Path, newest: str) -> None:
    older = "last.ckpt" if newest == "interrupted.ckpt" else "interrupted.ckpt"
    (tmp_path / older).write_bytes(b"old")
    (tmp_path / newest).write_bytes(b"new")
    now = time.time()
    os.utime(tmp_path / older, (now - 60, now - 60))
    trainer = SimpleNamespace(checkpoint_callbacks=[ModelCheckpoint(dirpath=str(tmp_path), save_last=True)],
                              log_dir=str(tmp_path))
    assert _resolve_ckpt_path(trainer, "last") == tmp_path / newest

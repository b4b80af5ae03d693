"""Full finetuning sharded over processes with FSDP (Lightning's ``ModelParallelStrategy``, FSDP2): two CPU
processes (gloo) give the same epochs, metrics and ball decisions as one process, each process holds about half of
the model and of p0, and the evaluation works when the processes get different numbers of batches.

Lightning's ``FSDPStrategy`` (FSDP1) needs CUDA (Lightning and torch both refuse the CPU); FSDP2 runs on CPU
processes. The same fit on two GPUs is ``test_fsdp_on_two_gpus`` (marked ``gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]  # tests/, where fsdp_probe.py is
TIMEOUT_S = 600
FSDP = ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size", "2",
        "--trainer.strategy.tensor_parallel_size", "1", "--trainer.devices", "2"]


def _fit(tmp_path: Path, name: str, extra: list[str], accelerator: str = "cpu",
         expect_ok: bool = True) -> subprocess.CompletedProcess:
    out = tmp_path / name
    # uneven shards: 5 evaluation examples and 9 general texts in batches of at most 2 give the two processes
    # different numbers of batches
    cmd = [sys.executable, "-m", "editing.cli", "fit", "--model", "FullEditor", "--model.base.name", "tiny-gpt2",
           "--model.gradient_checkpointing", "false", "--model.optimizer.lr", "1e-3", "--data.task",
           "pronoun_gender_bias", "--data.eval_limit", "5", "--data.general_limit", "9", "--data.max_examples", "2",
           "--trainer.max_epochs", "2", "--trainer.accelerator", accelerator, "--trainer.enable_progress_bar",
           "false", "--trainer.logger.init_args.save_dir", str(out), "--budget.output_dir", str(out),
           "--budget.save_edits", "false", "--checkpoint.save_last", "false", "--checkpoint.save_top_k", "0",
           "--trainer.callbacks+=fsdp_probe.ShardProbe", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "FSDP_PROBE_DIR": str(out / "probe"),
           # the checkout too: the package need not be installed (scripts/device/tests.sh runs it from the tree)
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    if expect_ok:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return proc


def _results(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / name / "results.json").read_text())


def _assert_same_fit(one: dict, two: dict) -> None:
    assert [e["epoch"] for e in two["epochs"]] == [e["epoch"] for e in one["epochs"]] == [0, 1, 2]
    for a, b in zip(one["epochs"], two["epochs"], strict=True):
        assert b["general_nll"] == pytest.approx(a["general_nll"], rel=1e-5)
        assert b["success_rate"] == a["success_rate"]
        assert b["counts"] == a["counts"]
    assert {k: v["epoch"] for k, v in two["balls"].items()} == {k: v["epoch"] for k, v in one["balls"].items()}


def _assert_sharded(probe: Path, processes: int) -> None:
    records = [json.loads(f.read_text()) for f in sorted(probe.glob("rank*_epoch1.json"))]
    assert len(records) == processes
    for part in ("model", "p0"):
        local = [r[part]["local"] for r in records]
        full = records[0][part]["full"]
        assert records[0][part]["kinds"] == ["DTensor"], part
        assert sum(local) >= full and max(local) < 0.6 * full, (part, local, full)  # each holds about 1/N
    assert all(r["p0"]["trainable"] == 0 for r in records)  # p0 stays frozen


def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path, data_root) -> None:
    _fit(tmp_path, "one", ["--trainer.devices", "1", "--trainer.limit_train_batches", "8",
                           "--trainer.accumulate_grad_batches", "2"])
    _fit(tmp_path, "fsdp", [*FSDP, "--trainer.limit_train_batches", "4"])
    _assert_same_fit(_results(tmp_path, "one"), _results(tmp_path, "fsdp"))
    _assert_sharded(tmp_path / "fsdp" / "probe", 2)


def test_fsdp_refuses_to_save_edits_it_cannot_gather(tmp_path, data_root) -> None:
    proc = _fit(tmp_path, "edits", [*FSDP, "--trainer.limit_train_batches", "2", "--budget.save_edits", "true"],
                expect_ok=False)
    assert proc.returncode != 0
    assert "--budget.save_edits false" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu(gpus=2)
def test_fsdp_on_two_gpus(tmp_path, data_root, gpu_device) -> None:
    # the command docs/architecture.md gives, on two GPUs (FSDP2 with NCCL), against one GPU
    accelerator = "gpu" if gpu_device.type == "cuda" else "cpu"
    _fit(tmp_path, "one", ["--trainer.devices", "1", "--trainer.limit_train_batches", "8",
                           "--trainer.accumulate_grad_batches", "2"], accelerator)
    _fit(tmp_path, "fsdp", [*FSDP, "--trainer.limit_train_batches", "4"], accelerator)
    _assert_same_fit(_results(tmp_path, "one"), _results(tmp_path, "fsdp"))
    _assert_sharded(tmp_path / "fsdp" / "probe", 2)


def test_fsdp1_strategy_is_refused_with_a_clear_error(tmp_path, data_root) -> None:
    # Lightning's FSDPStrategy refuses the CPU itself; a subclass gets past that check to reach the module's setup,
    # which runs before any wrapping
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    from editing.core.errors import ConfigError
    from editing.data.datamodule import TaskDataModule
    from editing.methods import FullEditor
    from editing.models.loading import ModelConfig

    class OnCPU(FSDPStrategy):
        pass

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=OnCPU(), max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    module = FullEditor(ModelConfig(name="tiny-gpt2", precision="fp32"), gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="ModelParallelStrategy"):
        trainer.fit(module, TaskDataModule(task="country_capital", eval_limit=2, general_limit=2))


def test_memit_refuses_several_processes_with_a_clear_error(data_root) -> None:
    # under DDP, Lightning's wrapper would fail deep inside torch (MEMIT has no parameter that needs a gradient)
    from types import SimpleNamespace

    from editing.core.errors import ConfigError
    from editing.methods import MEMITEditor

    module = MEMITEditor()
    module.trainer = SimpleNamespace(world_size=2, strategy=None, datamodule=None)
    with pytest.raises(ConfigError, match="MEMIT runs in one process.*--trainer.devices 1"):
        module.setup("fit")
    module.trainer = SimpleNamespace(world_size=1, strategy=None, datamodule=None)
    module.setup("fit")

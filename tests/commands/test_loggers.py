"""Logger presets (``lightning_configs/loggers/``): TensorBoard beside the CSV default, a resumed run whose
TensorBoard history reads as an uninterrupted run's, and sweep trials that log when their arguments ask for it.

Event files are read here with a plain TFRecord loop and TensorBoard's purge rule written out: a session-start
event at step S hides the events of earlier files at step S or after."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

pytest.importorskip("tensorboardX")

from tensorboardX.proto import event_pb2  # noqa: E402

from editing.cli import main  # noqa: E402
from editing.protocol.trials import FitSettings, names_a_logger  # noqa: E402
from editing.runs.metrics_log import keep_tensorboard_history  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "lightning_configs" / "loggers" / "tensorboard.yaml"


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Per tag, step -> value, as TensorBoard shows them: files in the order they were written, a session start at
    step S purging what earlier files logged at S or after."""
    files = []
    for path in folder.glob("events.out.tfevents.*"):
        data, at, events = path.read_bytes(), 0, []
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at: at + 8])
            events.append(event_pb2.Event.FromString(data[at + 12: at + 12 + length]))
            at += 12 + length + 4
        files.append(events)
    shown: dict[str, dict[int, float]] = {}
    for events in sorted(files, key=lambda events: events[0].wall_time):  # in the order they were begun
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                for steps in shown.values():
                    for step in [s for s in steps if s >= event.step]:
                        del steps[step]
            for value in event.summary.value:
                shown.setdefault(value.tag, {})[event.step] = value.simple_value
    return shown


def test_the_tensorboard_preset_logs_every_epoch_and_a_resume_keeps_the_history(tmp_path, data_root) -> None:
    tiny = REPO / "lightning_configs" / "tiny" / "lora.yaml"
    run = tmp_path / "run"
    args = ["fit", "--config", str(tiny), "--config", str(PRESET), "--data.data_root", str(data_root),
            "--budget.output_dir", str(run), "--trainer.log_every_n_steps", "1"]
    main([*args, "--trainer.max_epochs", "1"])
    first = sorted(run.glob("events.out.tfevents.*"))
    assert first
    main([*args, "--ckpt_path", "last"])  # the tiny config's 2 epochs
    results = json.loads((run / "results.json").read_text())
    assert [e["epoch"] for e in results["epochs"]] == [0, 1, 2]
    assert set(first) < set(run.glob("events.out.tfevents.*"))  # the first run's file is kept
    shown = scalars(run)
    nll = shown["val/general_nll"]
    assert list(nll.values()) == pytest.approx([e["general_nll"] for e in results["epochs"]], rel=1e-6)
    assert sorted(shown["train/loss"]) == list(range(6))  # 3 batches x 2 epochs, each step once


def test_a_resumed_log_hides_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    before = TensorBoardLogger(str(tmp_path), name="", version="")
    for step in range(10):
        before.log_metrics({"train/loss": float(step)}, step=step)
    before.finalize("success")
    after = TensorBoardLogger(str(tmp_path), name="", version="")
    assert keep_tensorboard_history(after, 6)
    for step in range(6, 9):
        after.log_metrics({"train/loss": 100.0 + step}, step=step)
    after.finalize("success")
    assert scalars(tmp_path)["train/loss"] == {**{s: float(s) for s in range(6)}, 6: 106.0, 7: 107.0, 8: 108.0}
    assert not keep_tensorboard_history(after, 3)  # its writer exists: too late to set the purge


def test_sweep_trials_log_when_their_arguments_name_a_logger(tmp_path) -> None:
    def trial(*fixed: str) -> list[str]:
        return FitSettings(config=Path("base.yaml"), task="country_capital", model="tiny-gpt2",
                           output_dir=tmp_path / "t", fixed=fixed).args()

    def logs_off(args: list[str]) -> bool:
        return any(a == "--trainer.logger" and b == "false" for a, b in zip(args, args[1:], strict=False))

    assert logs_off(trial())
    for fixed in (("--config", str(PRESET)), (f"--config={PRESET}",),
                  ("--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger")):
        assert names_a_logger(list(fixed))
        assert not logs_off(trial(*fixed))
        assert "--checkpoint.save_top_k" in trial(*fixed)  # the rest of the housekeeping stays
    task_only = REPO / "lightning_configs" / "tasks" / "country_capital.yaml"
    assert not names_a_logger(["--config", str(task_only)])
    assert not names_a_logger(["--config", str(tmp_path / "missing.yaml")])

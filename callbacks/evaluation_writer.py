"""Writes the results of ``editing validate``/``editing test`` next to each other: JSON plus per-example JSONL."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L

from editing.core.files import ensure_writable
from editing.core.types import EVALUATED_METRICS, Stage
from editing.runs.records import EVALUATION_FILE, write_evaluation
from editing.runs.tables import metrics_table


def default_output_dir(root: str | Path, model_name: str, task: str, split: str, stage: str) -> Path:
    """``<root>/<model>/<task>-<split>/<stage>``, with the model name made path-safe."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model_name).name if "/" in model_name else model_name)
    return Path(root) / safe / f"{task}-{split}" / stage


class EvaluationWriter(L.Callback):
    """After a validate or test run, write ``evaluation.json`` and ``evaluation_scores.jsonl``.

    Args:
        output_dir: folder for the two files (default: ``<root>/<model>/<task>-<split>/<stage>``).
        root: root of the default folder.
        overwrite: replace files of an earlier run (otherwise an existing run is an error).
    """

    def __init__(self, output_dir: str | None = None, root: str = "runs", overwrite: bool = False) -> None:
        self.output_dir = output_dir
        self.root = root
        self.overwrite = overwrite
        self.written: Path | None = None
        self.resolved_config: dict | None = None

    def _out(self, trainer: L.Trainer, module, stage: Stage) -> Path:
        dm = trainer.datamodule
        return Path(self.output_dir or default_output_dir(self.root, module.identity["name"], dm.task.name,
                                                          dm.split, stage))

    def _refuse_existing(self, trainer: L.Trainer, module, stage: Stage) -> None:
        # Fail before the evaluation runs, not after it, when the results would be refused anyway.
        ensure_writable(self._out(trainer, module, stage) / EVALUATION_FILE, self.overwrite,
                        "--report.overwrite true")

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._refuse_existing(trainer, pl_module, Stage.VALIDATE)

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        self._refuse_existing(trainer, pl_module, Stage.TEST)

    def _write(self, trainer: L.Trainer, module, stage: Stage) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        dm = trainer.datamodule
        out = self._out(trainer, module, stage)
        self.written = write_evaluation(
            out, module.last_evaluation, stage=stage, task=dm.task, split=dm.split, identity=module.identity,
            data_files=dm.describe(), overwrite=self.overwrite, config=self.resolved_config or None,
        )
        summary = module.last_evaluation
        print(metrics_table([{"task": dm.task.name, "examples": summary["counts"]["evaluation"],
                              **{k.value: summary[k] for k in EVALUATED_METRICS}}]))
        print(f"results: {self.written}")

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, Stage.VALIDATE)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._write(trainer, pl_module, Stage.TEST)

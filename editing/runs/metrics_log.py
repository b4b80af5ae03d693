"""Keeps a fit's metrics log whole across a resume: every row of the run, none twice (CSV), or every event, with
what the interrupted run logged after its checkpoint purged from view (TensorBoard).

Lightning's CSVLogger deletes ``metrics.csv`` whenever it opens a folder that holds one, so a resumed run's log
would start at the resume. ``keep_metrics_log`` makes the logger append to the log instead. The interrupted run may
have logged rows after the checkpoint the run resumes from; the resumed run logs those steps again, so when it logs
its first row of a kind (``train/...`` rows, ``val/...`` rows), the old rows of that kind from that step on are
dropped: the log ends up as an uninterrupted run's.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from editing.core.files import atomic_open


def row_kind(row: dict) -> frozenset[str]:
    """What a row logs: the prefixes (``train``, ``val``) of its metrics that have values."""
    return frozenset(key.split("/", 1)[0] for key, value in row.items()
                     if key not in ("epoch", "step") and value not in (None, ""))


def drop_replaced_rows(path: str | os.PathLike, first_steps: dict[frozenset[str], int]) -> None:
    """Remove from a metrics CSV the rows of each kind in ``first_steps`` whose step is at or after the given one
    (atomically)."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [row for row in rows
            if row_kind(row) not in first_steps or int(float(row["step"])) < first_steps[row_kind(row)]]
    if len(kept) == len(rows):
        return
    with atomic_open(path, "w", overwrite=True, newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)


class _ContinuingWriter(ExperimentWriter):
    """CSVLogger's writer for a resumed run: appends to the log it finds, replacing the rows the run logs again."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        with open(self.metrics_file_path, newline="", encoding="utf-8") as handle:
            # the header of the kept rows, so that a new column rewrites the file with every old column
            self.metrics_keys = list(csv.DictReader(handle).fieldnames or [])
        self._seen: set[frozenset[str]] = set()

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes metrics.csv here

    def save(self) -> None:
        first: dict[frozenset[str], int] = {}
        for row in self.metrics:
            kind = row_kind(row)
            if kind not in self._seen and kind not in first:
                first[kind] = int(row["step"])
        if first:
            drop_replaced_rows(self.metrics_file_path, first)
            self._seen.update(first)
        super().save()


def keep_metrics_log(logger: CSVLogger) -> bool:
    """Make ``logger`` continue its existing ``metrics.csv`` (see the module's docstring).

    Call before the fit starts (the logger's writer is made here, so Lightning never deletes the file).

    Returns:
        Whether there was a log to continue.
    """
    path = os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE)
    if not os.path.isfile(path) or logger._experiment is not None:
        return False
    logger._experiment = _ContinuingWriter(logger.log_dir)
    return True


def keep_tensorboard_history(logger, resumed_step: int) -> bool:
    """Make a TensorBoard logger of a resumed run purge from view what the interrupted run logged from
    ``resumed_step`` on: its new event file starts with a session-start marker at that step, which TensorBoard's
    readers take to hide the earlier files' events at or after it. The old event files are kept (Lightning never
    deletes them), so the history reads as an uninterrupted run's.

    Call before the fit starts (before the logger's writer is made).

    Args:
        logger: a ``lightning.pytorch.loggers.TensorBoardLogger``.
        resumed_step: the first logging step of the resumed run (the checkpoint's count of batches that stepped).

    Returns:
        Whether the purge was set (False when the writer exists already).
    """
    if getattr(logger, "_experiment", None) is not None:
        return False
    # the event file is named by the second and host it was begun on: a suffix keeps a resume begun in the same
    # second as the interrupted run from writing over its file
    suffix = f"{logger._kwargs.get('filename_suffix', '')}.resumed-{int(resumed_step)}-{os.getpid()}"
    logger._kwargs = {**logger._kwargs, "purge_step": int(resumed_step), "filename_suffix": suffix}
    return True

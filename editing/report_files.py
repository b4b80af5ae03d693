"""The evaluation results files: a JSON of metrics and provenance, and a JSONL of per-example scores."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from editing import __version__
from editing.results import ensure_writable, write_json, write_jsonl


def write_evaluation(output_dir: str | Path, summary: dict, *, stage: str, task, split: str, identity: dict,
                     data_files: dict, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``evaluation.json`` and ``evaluation_scores.jsonl`` into ``output_dir``.

    Args:
        output_dir: destination folder.
        summary: an evaluation summary (metrics, counts, per-example scores).
        stage: ``validate`` or ``test``.
        task: the ``TaskSpec``.
        split: data split.
        identity: the model identity.
        data_files: paths, hashes and counts of the data files used.
        overwrite: replace existing files.
        extra: more fields for the JSON (e.g. the resolved config).

    Returns:
        The JSON's path.
    """
    output_dir = Path(output_dir)
    json_path = output_dir / "evaluation.json"
    scores_path = output_dir / "evaluation_scores.jsonl"
    for path in (json_path, scores_path):
        ensure_writable(path, overwrite)
    write_jsonl(scores_path, summary["per_example"], overwrite=overwrite)
    record = {
        "stage": stage,
        "task": {"name": task.name, "loss": task.loss, "threshold": task.threshold},
        "split": split,
        "metrics": {k: summary[k] for k in ("success_rate", "general_nll", "targeted_nll", "hard_negative_nll")},
        "counts": summary["counts"],
        "model": identity,
        "data_files": data_files,
        "scores_file": scores_path.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "editing_version": __version__,
        **(extra or {}),
    }
    return write_json(json_path, record, overwrite=overwrite)

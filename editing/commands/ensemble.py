"""``editing ensemble``: a Backpack's edit carried to a larger model with the same tokenizer."""

from __future__ import annotations

import time
from pathlib import Path


def run_ensemble(large: str, backpack_edits: str, task: str = "country_capital", split: str = "val",
                 large_tokenizer: str | None = None, data_root: str | None = None, eval_limit: int | None = None,
                 general_limit: int | None = None, balls: list[float] | None = None,
                 output_dir: str | None = None, overwrite: bool = False, max_tokens: int = 1024,
                 allow_unverified: bool = False, device: str = "auto") -> dict:
    """Carry a Backpack's edit to a larger model with the same tokenizer: per ball, beta from 1.0 down in steps of
    0.1 until the ensemble's general NLL is inside the ball, then its evaluation (SPEC section 9).

    Args:
        large: the large model (see ``ModelConfig.name``).
        backpack_edits: a senses fit run folder (its ``edits/ball_<eps>``) or one Backpack edit folder.
        task: task name or task YAML.
        split: ``val`` or ``test``.
        large_tokenizer: override the large model's tokenizer (``gpt2`` for GPT-J offline).
        data_root: data folder (default: searched).
        eval_limit: first N examples of each task set.
        general_limit: first N texts of the general set.
        balls: eps values, each finite with 0 < eps < 1 and listed once (default 1e-3, 1e-4, 1e-5).
        output_dir: results go to ``<output_dir>/results.json`` (default: ``runs/<large>/<task>-<split>/ensemble``,
            the layout of ``editing validate``).
        overwrite: replace an earlier result there.
        max_tokens: padded-token budget per batch.
        allow_unverified: use Backpack edits saved without ``edit_manifest.json`` (by an older version).
        device: where both models run (``cuda``, ``cuda:1``, ``cpu``); ``auto``: the first GPU when there is one.

    Returns:
        The results written.
    """
    from editing.commands.devices import resolve_device
    from editing.core.files import write_json
    from editing.data.datamodule import TaskDataModule
    from editing.edits.load import load_edited
    from editing.models.loading import ModelConfig, load_model
    from editing.protocol.ensemble_search import ball_results, edit_folders, results_table, search
    from editing.rules.budget import parse_balls

    balls = parse_balls(balls, "--balls")
    where = resolve_device(device, "--device")
    target = _results_file(output_dir, large, task, split, overwrite)
    folders = edit_folders(backpack_edits, balls)
    large_model = load_model(ModelConfig(name=large, tokenizer=large_tokenizer))
    large_model.model.to(where)  # the search moves each Backpack edit to the large model's device
    backpacks = {key: load_edited(folder, allow_unverified=allow_unverified) for key, folder in folders.items()}
    dm = TaskDataModule(task=task, split=split, data_root=data_root, eval_limit=eval_limit,
                        general_limit=general_limit, max_tokens=max_tokens)
    started = time.time()
    found = search(large_model, backpacks, dm, balls)
    initial = found["initial"]
    summary = {"method": "ensemble", "task": dm.task.name, "split": split, "large": large_model.identity,
               "backpack_edits": {k: str(v) for k, v in folders.items()}, "vocab": found["vocab"],
               "initial": {k: v for k, v in initial.items() if k != "per_example"}, "balls": ball_results(found, balls),
               "seconds": round(time.time() - started, 1)}
    print(results_table(found, balls))
    write_json(target, summary)
    print(f"results: {target}")
    return summary


def _results_file(output_dir: str | None, large: str, task: str, split: str, overwrite: bool) -> Path:
    """``<output_dir>/results.json`` (default: the layout of ``editing validate``), refused when an earlier result is
    there (without ``overwrite``) before any model is loaded."""
    from callbacks.evaluation_writer import default_output_dir
    from editing.commands import DEFAULT_ROOT
    from editing.core.files import ensure_writable
    from editing.rules.tasks import get_task

    out = Path(output_dir) if output_dir else default_output_dir(DEFAULT_ROOT, large, get_task(task).name, split,
                                                                  "ensemble")
    target = out / "results.json"
    ensure_writable(target, overwrite)
    return target

"""``editing sequence``: sequential (lifelong) editing, a task's canonical examples in chunks, each chunk one fit on top
of the previous step's edit, measured after every step against the original model (``editing.protocol.sequence``)."""

from __future__ import annotations

from pathlib import Path

from editing.commands import DEFAULT_ROOT, repeatable


@repeatable("fit_config")
def sequence(fit_config: list[str], task: str = "country_capital", chunk_size: int = 1, steps: int | None = None,
             ball: float = 1e-3, split: str = "val", eval_limit: int | None = None, general_limit: int | None = None,
             data_root: str | None = None, seed: int = 0, fit_args: list[str] | None = None,
             output_dir: str | None = None, overwrite: bool = False) -> None:
    """Fit a task's canonical examples in chunks of ``chunk_size``, each chunk on top of the previous step's edit
    (``editing fit --base_edit``), and after each step measure every earlier chunk's success and the degradation
    against the original model: ``sequence.json``, ``sequence.csv`` and ``sequence.png`` in the output folder.

    Args:
        fit_config: the method's fit config (give it once per file, e.g. ``--fit_config
            lightning_configs/fit/rome.yaml``; later files override earlier ones).
        task: a built-in task or a task YAML; its canonical examples of ``split`` are chunked in file order.
        chunk_size: canonical examples per step.
        steps: how many chunks to fit (default: all).
        ball: the degradation ball (eps, around the ORIGINAL model's general NLL) whose edit each step saves and
            the next one continues.
        split: ``val`` or ``test``.
        eval_limit: first N examples of the task's evaluation, targeted and hard-negative sets (fits and table).
        general_limit: first N texts of the general sets (fits and table).
        data_root: folder of the task data (default: searched).
        seed: the seed of every fit.
        fit_args: more ``editing fit`` arguments for every step, as a JSON list (e.g. ``'["--trainer.max_epochs",
            "3"]'``).
        output_dir: the sequence's folder (default: ``runs/sequence/<task>-<split>``); a finished step in it is
            not redone.
        overwrite: start the sequence again in ``output_dir``, replacing its steps.
    """
    from editing.commands.lightning import run_lightning_cli
    from editing.protocol.sequence import SequenceSettings, run_sequence

    settings = SequenceSettings(fit_config=list(fit_config), task=task, chunk_size=chunk_size, steps=steps, ball=ball,
                                split=split, eval_limit=eval_limit, general_limit=general_limit, data_root=data_root,
                                seed=seed, fit_args=list(fit_args or []))
    out = Path(output_dir) if output_dir else Path(DEFAULT_ROOT) / "sequence" / f"{Path(task).stem}-{split}"
    run_sequence(settings, out, lambda args: run_lightning_cli("fit", args), overwrite=overwrite)
    print(f"sequence: {out / 'sequence.csv'}")

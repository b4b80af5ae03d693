"""``editing fit`` on a task of one's own: the small-data rule (issue 36 item 6).

The paper's settings (gradient accumulation 5, 10 epochs) were made for its built-in tasks; a practitioner's task of
a handful of examples then takes one or two optimizer steps an epoch. A fit of a task of one's own (``edit()``, or
``editing fit --data.task <task YAML>``) takes the accumulation and epochs of ``editing auto``'s small-data rule
(``editing.protocol.auto.SmallData``), unless the command line sets ``--trainer.accumulate_grad_batches`` (then
nothing changes) or ``--small_data false``. ``--trainer.max_epochs`` alone keeps those epochs and takes the rule's
accumulation. A built-in task, a sweep's trial and a test run (``--small_data false``) keep their config's settings.
Only methods whose config accumulates gradients (more than one batch a step) take the rule: MEMIT's closed-form
edit keeps its one epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import Namespace

from editing.core.errors import ConfigError
from editing.core.textfiles import read_text
from editing.rules.tasks import get_task

SMALL_DATA_OPTION = "--small_data"
SMALL_DATA_HELP = ("the small-data rule of editing auto (accumulation and epochs sized to the number of canonical "
                   "examples): null (the default) applies it to a task of one's own and not to a built-in task; "
                   "false keeps the config's settings (the paper's protocol: sweeps and test runs pass it)")


def given(args: Sequence[str], option: str) -> bool:
    """Whether the command line sets ``option`` (``--opt value`` or ``--opt=value``)."""
    return any(a == option or a.startswith(option + "=") for a in args)


def canonical_count(task: str, split: str, data_root: str | None) -> int:
    """The number of canonical examples (non-blank lines of the task's canonical file)."""
    spec = get_task(task)
    path = spec.file("canonical", split, data_root)
    if path is None:
        raise ConfigError(f"--data.task {task}: the task names no canonical file; add one (canonical: FILE)")
    return sum(1 for line in read_text(path).splitlines() if line.strip())


def apply_small_data(config: Namespace, args: Sequence[str]) -> str | None:
    """Set ``config``'s accumulation and epochs by the small-data rule when it applies (the module's docstring).

    Args:
        config: the parsed ``fit`` settings (changed in place).
        args: the command line, to tell what it sets.

    Returns:
        The note printed to say what was set, or None when the rule did not apply.
    """
    from editing.protocol.auto import SmallData

    choice = config.get("small_data")
    task = config["data"]["task"]
    if choice is False or (choice is None and get_task(task).builtin):
        return None
    trainer = config["trainer"]
    if given(args, "--trainer.accumulate_grad_batches") or int(trainer.get("accumulate_grad_batches") or 1) <= 1:
        return None
    epochs = int(trainer["max_epochs"]) if given(args, "--trainer.max_epochs") else None
    data = config["data"]
    small = SmallData.of(canonical_count(task, data.get("split") or "val", data.get("data_root")), epochs)
    trainer["accumulate_grad_batches"] = small.accumulate
    trainer["max_epochs"] = small.max_epochs
    note = (f"small-data defaults for {small.examples} canonical examples: accumulation {small.accumulate}, "
            f"{small.steps_per_epoch} optimizer steps an epoch, {small.max_epochs} epochs (--small_data false keeps "
            "the config's; --trainer.accumulate_grad_batches sets your own)")
    print(note, file=sys.stderr, flush=True)
    return note


__all__ = ["SMALL_DATA_HELP", "SMALL_DATA_OPTION", "apply_small_data", "canonical_count", "given"]

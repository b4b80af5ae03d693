"""The ``editing`` command: one table from command name to the function that runs it.

The bodies live in ``editing/commands/`` (one module per command family); a command's module is imported only
when that command runs, so ``editing --help`` imports neither torch nor Lightning. How commands read their
options and where they write is described once, in ``editing/commands/__init__.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import NamedTuple

from editing.core.errors import ConfigError, user_error


class Command(NamedTuple):
    """Where a command's function lives, and its one line of help."""

    module: str
    function: str
    help: str


COMMANDS: dict[str, Command] = {
    "fit": Command("editing.commands.lightning", "fit",
                   "train an edit of a model on a task, kept per degradation ball (LightningCLI)"),
    "validate": Command("editing.commands.lightning", "validate",
                        "evaluate a model on a task's validation pair (LightningCLI)"),
    "test": Command("editing.commands.lightning", "test", "evaluate a model on a task's test pair (LightningCLI)"),
    "evaluate": Command("editing.commands.evaluate", "evaluate_tasks",
                        "evaluate a model on several tasks, loaded once (one table)"),
    "apply": Command("editing.commands.apply", "apply_edit",
                     "apply a saved edit (or several, combined) to its base model; evaluate it beside the base"),
    "export": Command("editing.commands.export", "export",
                      "write an edit merged into its base model as a plain transformers folder (fp32 safetensors)"),
    "generate": Command("editing.commands.generate", "generate",
                        "continue prompts with the base model and with an edit of it, side by side"),
    "cache list": Command("editing.commands.cache", "cache_list",
                          "what the cache folder holds: per kind (models, teacher cache, ...) its entries and size"),
    "cache clear": Command("editing.commands.cache", "cache_clear",
                           "remove cache entries to free disk space (by kind, name or age; --dry_run true to see)"),
    "data download": Command("editing.commands.data", "download_data",
                             "download the task data from the paper's public repository"),
    "senses inspect": Command("editing.commands.senses", "inspect_senses",
                              "list the senses a sense edit changed, with their top words"),
    "ensemble": Command("editing.commands.ensemble", "run_ensemble",
                        "carry a Backpack edit to a larger model (beta searched per ball)"),
    "backpack distill": Command("editing.commands.backpack", "distill",
                                "distil a Backpack from a causal LM on a corpus (LightningCLI)"),
    "backpack cache-teacher": Command("editing.commands.backpack", "cache_teacher",
                                      "compute a teacher's outputs on a corpus once, for distillation (resumable)"),
    "backpack export": Command("editing.commands.backpack", "export",
                               "write a distillation checkpoint's Backpack as a model folder"),
    "sweep": Command("editing.commands.protocol", "sweep",
                     "random search on the validation pair (start several workers to share it)"),
    "sweep-status": Command("editing.commands.protocol", "sweep_status",
                            "a sweep's progress: trials done, running, failed; best per ball"),
    "select": Command("editing.commands.protocol", "select",
                      "the best validation configuration and epoch per ball"),
    "test-runs": Command("editing.commands.protocol", "test_runs",
                         "rerun the selected configurations on the test pair with several seeds"),
    "report": Command("editing.commands.protocol", "report",
                      "tables (Markdown, LaTeX) and plots (PNG) from the test runs"),
    "sequence": Command("editing.commands.sequence", "sequence",
                        "edit a task's canonical examples in chunks, each on top of the last edit (lifelong editing)"),
    "auto": Command("editing.commands.auto", "auto",
                    "search hyperparameters for the best edit inside a ball, within a budget of trials or minutes"),
}
GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})
"""First words of the two-word commands (``cache``, ``data``, ``senses``, ``backpack``)."""


def overview(group: str | None = None) -> str:
    """The text of ``editing --help`` (or of ``editing <group> --help``): every command with its line of help."""
    names = [n for n in COMMANDS if group is None or n.split()[0] == group]
    width = max(len(n) for n in names) + 2
    lines = ["usage: editing <command> [options]      (`editing <command> --help`: the command's options)", "",
             "canonical-editing: edit language models from canonical examples (Hewitt et al., 2024).", "",
             "commands:"]
    lines += [f"  {name:<{width}}{COMMANDS[name].help}" for name in names]
    lines += ["", "Each command writes one folder: its --output_dir (fit: --budget.output_dir, validate/test:",
              "--report.output_dir), by default under runs/ in the current folder."]
    return "\n".join(lines)


def find_command(args: list[str]) -> tuple[str, list[str]]:
    """The command a command line names and the arguments after it.

    Raises:
        ConfigError: an unknown command (naming the closest one), or a group word without its command.
    """
    import difflib

    first = args[0]
    if first in GROUPS:
        second = args[1] if len(args) > 1 else None
        name = f"{first} {second}"
        if name in COMMANDS:
            return name, args[2:]
        choices = [n.split()[1] for n in COMMANDS if n.split()[0] == first]
        close = difflib.get_close_matches(second or "", choices, n=1) if second else []
        given = f"unknown command {name!r}" if second and not second.startswith("-") else \
            f"`editing {first}` takes a command"
        raise ConfigError(f"{given}" + (f" (did you mean {first + ' ' + close[0]!r}?)" if close else "")
                          + f"; choose one of: {', '.join(choices)} (e.g. `editing {first} {choices[0]} --help`)")
    if first in COMMANDS:
        return first, args[1:]
    candidates = [*COMMANDS, *GROUPS]
    close = difflib.get_close_matches(first, candidates, n=1) or difflib.get_close_matches(
        first, [n.replace(" ", "-") for n in COMMANDS], n=1)
    close = [c.replace("-", " ") if c.replace("-", " ") in COMMANDS else c for c in close]
    raise ConfigError(f"unknown command {first!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; the commands are {', '.join(COMMANDS)} (`editing --help`)")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``editing`` command."""
    args = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.argv[1:] = args  # a DDP launcher reruns sys.argv for the other ranks
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        if not args:
            print("\nerror: give a command", file=sys.stderr)
            raise SystemExit(2)
        return
    if args[0] in GROUPS and args[1:2] in (["-h"], ["--help"]):
        print(overview(args[0]))
        return
    from editing.core import interruption
    interruption.forget()
    interruption.install()
    name, rest = args[0], args[1:]
    try:
        name, rest = find_command(args)
        from editing.runs.console import quiet_dependencies

        quiet_dependencies()
        rest = shipped_configs(rest)
        check_config_files(rest)
        import importlib

        command = COMMANDS[name]
        func = getattr(importlib.import_module(command.module), command.function)
        from editing.commands import run_command

        run_command(name, func, rest, command.help)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (interruption.Interrupted): what was kept, how to resume
        print(interruption.message(name, rest, err), file=sys.stderr)
        raise SystemExit(interruption.exit_code(err)) from None
    except Exception as err:  # noqa: BLE001 - only our own errors are turned into messages, others re-raise
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join_negative_values(args: list[str]) -> list[str]:
    """``--key -1e-3`` as ``--key=-1e-3``: argparse takes a negative number in exponent notation for an option and
    then reports a confusing "expected one argument" about another option."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if (arg.startswith("--") and "=" not in arg and i + 1 < len(args)
                and NEGATIVE_NUMBER.fullmatch(args[i + 1])):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def shipped_configs(args: list[str]) -> list[str]:
    """``--config lightning_configs/...`` read from the shipped configs when the current folder has no such file
    (an installed wheel, run outside the checkout): ``editing.core.paths.shipped_config_path``."""
    from editing.core.paths import shipped_config_path

    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = shipped_config_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + shipped_config_path(arg[len("--config="):])
    return out


def check_config_files(args: list[str]) -> None:
    """A ``--config`` file that is not UTF-8 or not valid YAML, reported with its file and line (jsonargparse would
    report neither)."""
    from editing.core.textfiles import load_yaml

    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else \
            arg[len("--config="):] if arg.startswith("--config=") else None
        if path is not None and Path(path).is_file():
            load_yaml(path, "config file")


if __name__ == "__main__":
    main()

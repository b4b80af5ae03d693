"""The bodies of the ``editing`` commands, one module per command family (``editing/cli.py`` holds the table).

Two ways a command reads its command line, and no other:

- LightningCLI, for the commands that run a Lightning Trainer: ``fit``, ``validate``, ``test``
  (``lightning.py``) and ``backpack distill`` (``backpack.py``). Their functions are marked
  ``@parses_own_arguments`` and receive the raw arguments.
- ``run_function`` below, for every other command: a jsonargparse parser built from the function's signature and
  its Google-style docstring (each ``Args:`` entry is the option's help), plus ``--config FILE`` for a YAML of the
  same settings.

Output folders
--------------
One rule for every command: **a command writes into one folder; ``output_dir`` names that folder exactly, and
without it the folder is made under ``runs/`` in the current directory** (an evaluation of a saved edit goes beside
the edit, downloaded data into the cache). A ``root`` is a folder holding several such folders (one per run, study
or task), never one run's files.

==================  ===========================================  ===============================================
command             default folder                               set it with
==================  ===========================================  ===============================================
fit                 ``runs/fit/version_N`` (the logger's)        ``--budget.output_dir DIR`` (this run's folder:
                                                                 logs and checkpoints too);
                                                                 ``--trainer.default_root_dir ROOT``: the
                                                                 logger's folder is ``ROOT/fit/version_N``
validate, test      ``runs/<model>/<task>-<split>/<stage>``      ``--report.output_dir DIR``; the root:
                                                                 ``--trainer.default_root_dir`` (or
                                                                 ``--report.root``)
backpack distill    ``runs/distill/version_N`` (the logger's)    ``--trainer.default_root_dir ROOT``; the
                                                                 distilled model goes to ``--model.output``
evaluate            ``runs/evaluate`` (``<task>-<split>/`` in)   ``--output_dir DIR``
apply               ``<edit>/eval-<task>-<split>``; several      ``--output_dir DIR``
                    edits: ``runs/combined/version_N``
generate            (prints only)
ensemble            ``runs/<large>/<task>-<split>/ensemble``     ``--output_dir DIR``
backpack export     (required)                                   ``--output_dir DIR``
export              (required)                                   ``--merged DIR`` (a transformers model folder)
(backpack)          ``<cache>/teacher_cache/<key>``              ``--model.teacher_cache.folder ROOT`` (a cache
 cache-teacher                                                   per key under it)
report              ``runs/report``                              ``--output_dir DIR``
sweep, sweep-status ``runs/sweeps/<study>/``                     ``--root ROOT`` (a folder of sweeps)
select, test-runs   ``runs/sweeps/<study>/``                     ``--root ROOT``; ``report --root`` reads them
data download       ``~/.cache/canonical-editing/data``          ``--root ROOT`` (what ``--data.data_root`` reads)
cache list, clear   (prints only; clear removes cache entries)   ``$EDITING_CACHE``, ``$EDITING_EVAL_CACHE_DIR``
==================  ===========================================  ===============================================

``--trainer.default_root_dir`` is Lightning's root: with the default logger (a CSVLogger under ``runs``) the
logger's folder moves under it; with ``--trainer.logger false`` it is the run folder itself (the sweep's trials
use this). A logger configured with another ``save_dir``, or a ``--report.root`` that differs from it, is refused
with a message rather than silently ignored. validate and test keep no CSV log (their results are the report
folder's files). Nothing is ever overwritten without ``overwrite``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

DEFAULT_ROOT = "runs"
"""The folder, relative to the current directory, under which commands make their default output folders."""


def parses_own_arguments(func: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Mark a command function that takes the raw command line (the LightningCLI commands)."""
    func.parses_own_arguments = True  # type: ignore[attr-defined]
    return func


def repeatable(*names: str) -> Callable[[Callable], Callable]:
    """Mark list options given once per value (``--prompt A --prompt B``); jsonargparse alone keeps the last."""
    def mark(func: Callable) -> Callable:
        func.repeatable = names  # type: ignore[attr-defined]
        return func
    return mark


def _appending(args: list[str], names: tuple[str, ...]) -> list[str]:
    """``--name VALUE`` as jsonargparse's ``--name+ VALUE`` (append to the list) for the repeatable ``names``.

    Raises:
        ConfigError: a value that is not UTF-8 text (bytes the shell passed undecoded), naming the option and which
            of its occurrences; jsonargparse would drop every earlier value of the list for it.
    """
    from editing.core.errors import ConfigError
    from editing.core.textfiles import not_text

    out = []
    seen: dict[str, int] = {}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not (key[2:] in names and key.startswith("--")):
            out.append(arg)
            continue
        seen[key] = seen.get(key, 0) + 1
        given = value if eq else args[i + 1] if i + 1 < len(args) else ""
        problem = not_text(given, from_bytes=True)
        if problem is not None:
            raise ConfigError(f"{key} {seen[key]}: {problem}; give it as UTF-8 text (check the encoding of the "
                              "terminal or script that passes it)")
        out.append(f"{key}+{eq}{value}")
    return out


def _python_only(func: Callable) -> set[str]:
    """Parameters a command line cannot give: callables (tests pass them to replace, e.g., the fit runner)."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - an unresolvable annotation is simply not a callable one
        return set()
    skip = set()
    for name, hint in hints.items():
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(typing.get_origin(o) is Callable or o is Callable for o in options):
            skip.add(name)
    return skip


def function_parser(name: str, func: Callable, summary: str):
    """The parser of a plain command: ``--config`` plus one option per parameter of ``func``.

    Args:
        name: the command's name (``data download``).
        func: the command's function; its docstring's first paragraph is the description and each ``Args:`` entry
            the help of an option.
        summary: the command's one-line help (used when ``func`` has no docstring).

    Returns:
        A jsonargparse parser with concise errors.
    """
    from jsonargparse import ActionConfigFile

    from editing.commands.parsing import ArgumentParser

    description = (inspect.getdoc(func) or summary).split("\n\n")[0]
    parser = ArgumentParser(prog=f"editing {name}", description=description)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of these settings (later --config files and options override it)")
    parser.add_function_arguments(func, skip=_python_only(func))
    return parser


def run_function(name: str, func: Callable, args: list[str], summary: str) -> Any:
    """Parse ``args`` with ``function_parser`` and call ``func`` with the settings.

    Args:
        name: the command's name.
        func: the command's function.
        args: the command line after the command's name.
        summary: the command's one-line help.

    Returns:
        What ``func`` returns.
    """
    parser = function_parser(name, func, summary)
    cfg = parser.parse_args(_appending(args, getattr(func, "repeatable", ())))
    return func(**{k: v for k, v in vars(cfg).items() if k != "config"})


def run_command(name: str, func: Callable, args: list[str], summary: str) -> Any:
    """Run one command: LightningCLI commands read ``args`` themselves, the others through ``run_function``."""
    if getattr(func, "parses_own_arguments", False):
        return func(args)
    return run_function(name, func, args, summary)

"""Command-line parse errors a user can read: the setting at fault and what it accepts, without the usage dump.

jsonargparse reports a bad value of a nested setting (``--model.base.precision fp16``) as a tree of union subtypes
and "Given value" lines, after printing the whole usage. ``concise_parser_message`` keeps the leaves of that tree
prefixed with the dotted setting they belong to, e.g. ``model.base.precision: Expected a typing.Literal['fp32',
'bf16']. Got value: fp16``; ``ArgumentParser`` below and the LightningCLI parser of ``editing.commands.lightning``
(both with ``ClearErrorsMixin``) print that and point at ``--help``.
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

import jsonargparse

NOISE = (
    re.compile(r"^Does not validate against any of the Union subtypes$"),
    re.compile(r"^Subtypes: "),
    re.compile(r"^Errors:$"),
    re.compile(r"^- Expected a <class 'NoneType'>$"),
    re.compile(r"^Given value type: "),
    re.compile(r"^Given value: .*(NestedArg|Namespace)\("),
    re.compile(r"^- Problem with given class_path .*:$"),
)
KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":\s*(.*)$')


def concise_parser_message(message: str) -> str:
    """The leaves of a nested jsonargparse error, each prefixed with its dotted setting; other messages unchanged.

    Args:
        message: the message jsonargparse passes to ``ArgumentParser.error``.

    Returns:
        One line per distinct problem, joined by newlines.
    """
    lines = message.splitlines()
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    for line in lines:
        text = line.strip()
        if not text or any(p.search(text) for p in NOISE):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = KEY.match(text)
        if key:
            stack.append((indent, key.group(1)))
            text = key.group(2).strip()
            if not text:
                continue
        text = text[2:] if text.startswith("- ") else text
        where = ".".join(k for _, k in stack)
        prefix = f"{where}: " if where else ""
        if text.startswith("Given value: "):  # the value a type check above rejected
            if out and out[-1].startswith(prefix) and "Got value" not in out[-1]:
                out[-1] = f"{out[-1].rstrip('.')}. Got value: {text[len('Given value: '):]}"
            continue
        entry = prefix + text
        if entry not in out:
            out.append(entry)
    return "\n".join(out) if out else message


def _command(parser) -> str:
    prog = parser.prog.replace(" [options]", "").split()
    return " ".join(["editing", *prog[1:]]) if prog else "editing"


class ClearErrorsMixin:
    """``error()`` that prints the concise message and where to find the accepted options, then exits with 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)  # raises (jsonargparse parses nested values this way)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"error: {concise_parser_message(message)}\n"
                         f"(`{_command(parser)} --help` lists every option and the values it accepts)\n")
        self.exit(2)


class ArgumentParser(ClearErrorsMixin, jsonargparse.ArgumentParser):
    """jsonargparse's ``ArgumentParser`` with concise errors (the commands besides the LightningCLI ones)."""

"""Reading the user's text files (task YAMLs, configs, search spaces, data lines) with errors that name the file and
line: a byte that is not UTF-8, or YAML that does not parse, never surfaces as a decoder's traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from editing.core.errors import ConfigError, DataFormatError

UTF8_FIX = "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 FILE`)"


def decode_line(raw: bytes, path: str | Path, lineno: int) -> str:
    """One line of a file as text.

    Args:
        raw: the line's bytes.
        path: the file, for the message.
        lineno: the 1-based line number, for the message.

    Returns:
        The decoded line.

    Raises:
        DataFormatError: the line is not UTF-8; the message names the file, line, column and byte.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        byte = raw[err.start]
        raise DataFormatError(str(path), lineno, f"byte 0x{byte:02x} at column {err.start + 1} is not UTF-8 text; "
                                                 f"{UTF8_FIX}") from None


SURROGATE_FIX = ("write the character itself, or both halves of its surrogate pair (e.g. \\ud83d\\ude00 for one "
                 "emoji)")


def not_text(text: str, from_bytes: bool = False) -> str | None:
    """What in ``text`` is not text a tokenizer takes: the first lone surrogate (U+D800 to U+DFFF), which has no
    UTF-8 form (a JSON escape like ``\\ud800`` without its other half, or a byte that was not UTF-8).

    Args:
        text: the string.
        from_bytes: the string was decoded with ``surrogateescape`` (command-line arguments), where U+DC80 to U+DCFF
            stand for bytes that were not UTF-8; those are then reported as the bytes.

    Returns:
        None for text that encodes as UTF-8; else its first offending character, 1-based, described.
    """
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        index = err.start
    code = ord(text[index])
    if from_bytes and 0xDC80 <= code <= 0xDCFF:
        return f"byte 0x{code - 0xDC00:02x} at character {index + 1} is not UTF-8 text"
    return (f"character {index + 1} is U+{code:04X}, a lone surrogate (half of a UTF-16 surrogate pair without its "
            "other half), which is not text")


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file.

    Raises:
        DataFormatError: a byte is not UTF-8 (the message names the line), or the file cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataFormatError(str(path), None, f"cannot be read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            decode_line(raw, path, lineno)
        raise  # unreachable: some line failed to decode


def load_yaml(path: str | Path, what: str = "YAML file") -> Any:
    """Parse a YAML file, naming the file and line of a syntax error.

    Args:
        path: the file.
        what: what the file is, for messages (``task YAML``, ``search space``).

    Raises:
        ConfigError: the file is missing, not UTF-8, or not valid YAML.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = read_text(path)
    except DataFormatError as err:
        raise ConfigError(str(err)) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the {what}'s syntax") from None

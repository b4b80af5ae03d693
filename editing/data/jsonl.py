"""Reading task JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from editing.core.errors import DataFormatError
from editing.core.textfiles import SURROGATE_FIX, decode_line, not_text


@dataclass(frozen=True)
class Record:
    """One line of a task file: the fields that scoring uses, plus where it came from."""

    index: int
    """0-based position among the file's examples."""
    line: int
    """1-based line number in the file."""
    prefix: str = ""
    suffixes: tuple[str, ...] = ()
    text: str | None = None
    fields: dict | None = None
    """All fields of the line (for subject spans and other task-specific uses)."""


def read_jsonl(path: str | Path, kind: str, limit: int | None = None) -> list[Record]:
    """Read a task file.

    Args:
        path: the JSONL file.
        kind: ``single`` (prefix, suffix), ``pair`` (prefix, suffix1, suffix2), ``text`` (text) or
            ``suffix_or_text`` (prefix/suffix lines, or text lines: used for hard negatives).
        limit: keep only the first ``limit`` examples.

    Returns:
        The records, in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(str(path), None, "file not found (check the data root or run `editing data download`)")
    records: list[Record] = []
    with path.open("rb") as handle:  # bytes, so that a line that is not UTF-8 is reported with its number
        for lineno, data in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            raw = decode_line(data, path, lineno)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataFormatError(str(path), lineno, f"not valid JSON ({err.msg} at column {err.colno}); "
                                                   "each line must be one JSON object") from err
            if not isinstance(obj, dict):
                raise DataFormatError(str(path), lineno, f"expected a JSON object, got {type(obj).__name__}")
            records.append(_record(obj, kind, path, lineno, len(records)))
    if not records:
        raise DataFormatError(str(path), None, "no examples in file")
    return records


def _need_str(obj: dict, key: str, path: Path, lineno: int, expected: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise DataFormatError(str(path), lineno, f"missing key {key!r}; expected {expected}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataFormatError(str(path), lineno, f"field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and value == "":
        raise DataFormatError(str(path), lineno, f"field {key!r} is empty; a suffix must have at least one token")
    problem = not_text(value)
    if problem is not None:  # the tokenizer would fail on it with a TypeError naming neither file nor line
        raise DataFormatError(str(path), lineno, f"field {key!r}: {problem}; {SURROGATE_FIX}")
    return value


def _record(obj: dict, kind: str, path: Path, lineno: int, index: int) -> Record:
    if kind == "suffix_or_text":
        kind = "text" if "text" in obj and "suffix" not in obj else "single"
    if kind == "single":
        expected = 'keys "prefix" and "suffix"'
        prefix = _need_str(obj, "prefix", path, lineno, expected, allow_empty=True)
        return Record(index, lineno, prefix, (_need_str(obj, "suffix", path, lineno, expected),), fields=obj)
    if kind == "pair":
        expected = 'keys "prefix", "suffix1" and "suffix2"'
        prefix = _need_str(obj, "prefix", path, lineno, expected, allow_empty=True)
        suffixes = tuple(_need_str(obj, k, path, lineno, expected) for k in ("suffix1", "suffix2"))
        return Record(index, lineno, prefix, suffixes, fields=obj)
    if kind == "text":
        return Record(index, lineno, text=_need_str(obj, "text", path, lineno, 'key "text"'), fields=obj)
    raise ValueError(f"unknown record kind {kind!r}")

"""Errors raised for bad input: each names the file, line or setting at fault and how to fix it."""


class EditingError(Exception):
    """Base class for errors that are the user's to fix (bad data, config, or model name)."""


class DataFormatError(EditingError, ValueError):
    """A data file is malformed: the message names the file and line."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


class ConfigError(EditingError, ValueError):
    """A setting has a bad value: the message names the setting."""


class ModelNotAvailableError(EditingError, OSError):
    """A model cannot be loaded here (e.g. a hub id without network)."""

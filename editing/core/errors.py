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


def user_error(err: BaseException | None) -> EditingError | None:
    """The user-facing error behind ``err``, or None: jsonargparse wraps an error raised while it builds classes
    (a ``ConfigError`` of a setting's validation) in its own ``ValueError``, so the chain of causes is searched.

    Args:
        err: the exception caught.

    Returns:
        The first ``EditingError`` among ``err`` and its causes and contexts.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, EditingError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None

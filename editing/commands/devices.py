"""The ``--device`` setting of the commands that run a model outside a Lightning Trainer."""

from __future__ import annotations

import torch

from editing.core.errors import ConfigError


def resolve_device(device: str, setting: str = "--device") -> torch.device:
    """The device ``device`` names: ``auto`` (the first GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:<n>``.

    Raises:
        ConfigError: an unknown name, or a GPU that this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"{setting}={device!r} is not a device ({err}); use auto, cpu, cuda or cuda:<n>") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (where.index or 0) >= count:
            raise ConfigError(f"{setting}={device!r}: this machine has {count} CUDA device(s); use auto or cpu")
    elif where.type != "cpu":
        raise ConfigError(f"{setting}={device!r}: only cpu and cuda devices are supported; use auto, cpu or cuda")
    return where

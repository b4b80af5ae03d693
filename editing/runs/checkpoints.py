"""Loading checkpoint files without ever unpickling code, and with errors that say what is wrong with the file.

A Lightning checkpoint is a ``torch.save`` zip archive: a pickle (``data.pkl``) plus one member per tensor. Unpickling
a file someone else wrote can run arbitrary code, so every checkpoint the package reads goes through
``load_checkpoint_file``: ``torch.load(weights_only=True)``, which accepts tensors, containers and primitive values
only. Our checkpoints hold nothing else (hyperparameters are plain dicts). The zip members' CRC-32 checksums are
verified first: ``torch.load`` does not check them, so a flipped bit in a tensor would otherwise load silently.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from editing.core.errors import ConfigError

REFUSED_CODE = ("it needs code to unpickle ({detail}), and canonical-editing never runs code from a checkpoint file "
                "(it was not written by canonical-editing, or it was tampered with)")


class CheckpointFileError(ConfigError):
    """A checkpoint file is missing, damaged, or not a checkpoint this package can load safely."""


def load_checkpoint_file(path: str | Path, map_location: Any = "cpu", fix: str | None = None) -> dict:
    """Load a checkpoint with ``weights_only=True`` after checking the file is an intact ``torch.save`` archive.

    Args:
        path: the checkpoint file.
        map_location: as for ``torch.load``.
        fix: what the user can do instead (appended to every message); default: use another checkpoint.

    Returns:
        The checkpoint dictionary.

    Raises:
        CheckpointFileError: the file is missing, empty, truncated, not a zip archive, fails its checksums, holds
            something that needs code to unpickle, or is not a dictionary.
    """
    remote = "://" in str(path)
    path = Path(path)
    fix = fix or ("use another checkpoint of the run (e.g. an `epoch=...ckpt` beside it) or start the run again "
                  "without --ckpt_path")

    def fail(problem: str) -> CheckpointFileError:
        return CheckpointFileError(f"checkpoint {path}: {problem}; {fix}")

    if remote:
        raise fail("only local files are loaded (download it first)")
    if not path.exists():
        raise fail("file not found")
    if not path.is_file():
        raise fail("is not a file")
    size = path.stat().st_size
    if size == 0:
        raise fail("the file is empty (an interrupted save or copy)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        raise fail(f"not a PyTorch checkpoint archive ({size} bytes; truncated, or not a checkpoint at all)") from None
    except (OSError, EOFError, ValueError) as err:
        raise fail(f"unreadable archive ({err})") from None
    if bad is not None:
        raise fail(f"the file is corrupted: member {bad!r} fails its checksum (flipped bits or an incomplete copy)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _unpickling_detail(err)
        if detail is not None:
            raise fail(REFUSED_CODE.format(detail=detail)) from None
        raise fail(f"the file is corrupted ({str(err).splitlines()[0]})") from None
    except Exception as err:  # noqa: BLE001 - any other failure of the loader means a damaged file
        raise fail(f"the file is corrupted ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") \
            from None
    if not isinstance(checkpoint, dict):
        raise fail(f"holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def _unpickling_detail(err: Exception) -> str | None:
    """The global the safe unpickler refused (e.g. ``GLOBAL os.system``), or None for plain corruption."""
    text = str(err)
    for marker in ("Unsupported global:", "Unsupported class", "Trying to call reduce", "Can only build Tensor"):
        if marker in text:
            start = text.index(marker)
            line = text[start:].splitlines()[0]
            return line.split(" was not an allowed global")[0].rstrip(" .")
    return None


CKPT_PATH_FIX = "pass --ckpt_path an intact checkpoint of this run (or `last`), or start again without --ckpt_path"


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, loading through ``load_checkpoint_file`` whatever ``weights_only`` it is given
    (``--ckpt_path`` of fit/validate/test, ``last`` included, and ``--weights_only false`` too)."""

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path, map_location=map_location if map_location is not None else "cpu")


def secure_trainer(trainer) -> None:
    """Make ``trainer`` load checkpoints through ``SafeCheckpointIO`` (a custom checkpoint IO is left alone only
    when it is not Lightning's default one)."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()


class SafeCheckpointsMixin:
    """For LightningCLI subclasses: check a ``--ckpt_path`` file before Lightning reads its hyperparameters, and
    load checkpoints in the trainer through ``SafeCheckpointIO``."""

    def _check_ckpt_file(self) -> None:
        """Refuse a ``--ckpt_path`` FILE that is missing, corrupt or holds code, before anything else reads it."""
        subcommand = self.config.get("subcommand") if self.config is not None else None
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            # a typo'd path would otherwise be silently ignored here and fail later inside the trainer
            load_checkpoint_file(ckpt_path, fix=CKPT_PATH_FIX)

    def _parse_ckpt_path(self) -> None:
        self._check_ckpt_file()
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        secure_trainer(trainer)
        return trainer

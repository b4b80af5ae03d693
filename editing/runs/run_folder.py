"""A fit's run folder: claimed by one fit at a time, checked before training starts, and its files kept on resume.

A fit claims its folder by creating ``run.lock`` (pid, host, start time) atomically; a second fit aimed at the same
folder fails at once instead of replacing the first one's results at its end. The claim is removed when the
results are written. A claim left by a fit that was killed names a process that no longer runs: resuming that fit
(``--ckpt_path``) takes it over, anything else is refused with the ways to proceed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from editing.core.errors import EditingError
from editing.core.files import ResultsExistError, create_exclusive

CLAIM_NAME = "run.lock"
# Files a fit leaves in its folder before its results exist: a folder holding any of them belongs to a run that
# did not finish (or to a logger version in use), which a new fit must not clobber unless asked to.
RUN_FILES = ("metrics.csv", "config.yaml", "edits", "partial")
PARTIAL_DIR = "partial"
"""Where a fit writes its record so far and its in-ball edits after each epoch (``--budget.partial``): a run that
did not finish, never mistaken for a finished one (its ``results.json`` is not the run folder's)."""


class RunFolderError(EditingError, RuntimeError):
    """A fit cannot use its run folder: another fit holds it, an unfinished run is in it, or it is not writable."""


class ResultsWriteError(EditingError, OSError):
    """Results could not be written where they belong; the message names where they were saved instead."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    # field 22 of /proc/<pid>/stat: the start time since boot; with the boot id it tells a reused pid apart
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _my_identity() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "process_start": _process_start(os.getpid())}


def holder_alive(info: dict) -> bool | None:
    """Whether the process that wrote a claim still runs: True, False, or None when it cannot be told (another
    host). This process's own claims count as not running (a fit in this process has ended before another starts)."""
    if info.get("host") != socket.gethostname():
        return None
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if info.get("boot_id") and info.get("boot_id") != _boot_id():
        return False
    start = _process_start(pid)
    if start is not None or Path("/proc").is_dir():
        return start is not None and (info.get("process_start") in (None, start))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(info: dict) -> str:
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}"


def read_claim(folder: str | Path) -> dict | None:
    """The claim in ``folder`` (None when there is none); an unreadable claim reads as an empty one."""
    path = Path(folder) / CLAIM_NAME
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return {}


def _leftovers(folder: Path) -> list[str]:
    found = [name for name in RUN_FILES if (folder / name).exists()]
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")):
        found.append("checkpoints/")
    return found


@dataclass
class Claim:
    """A held claim on a run folder."""

    path: Path
    info: dict

    def release(self) -> None:
        """Remove the claim if it is still this one (another fit may have taken over a claim it judged stale)."""
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.path.read_text()).get("token") == self.info["token"]:
                self.path.unlink()


def check_folder(folder: str | Path, resuming: bool, overwrite: bool, flag: str = "--budget.overwrite true",
                 restarting: bool = False) -> None:
    """Refuse, before anything is written, a fit that would clobber another run in ``folder``.

    Args:
        folder: the run folder (results, edits) or the logger's folder (metrics, config, checkpoints).
        resuming: the fit resumes from a checkpoint (it continues the run in the folder).
        overwrite: replacing an earlier run was asked for.
        flag: the setting that asks for it, for the message.
        restarting: ``--ckpt_path last`` found no checkpoint: the fit starts over in the folder of a run that was
            interrupted before its first checkpoint (its leftovers may be replaced, a finished run may not).

    Raises:
        RunFolderError: a live fit holds the folder, or an unfinished run is in it.
        ResultsExistError: a finished run is in it.
    """
    folder = Path(folder)
    info = read_claim(folder)
    if info is not None:
        alive = holder_alive(info)
        if alive or (info == {} and not (resuming or overwrite)):
            raise RunFolderError(
                f"{folder} is in use by another fit ({_describe(info)}; claim file {folder / CLAIM_NAME}). Wait for "
                "it to finish or choose another output folder; if no such fit runs any more, resume it with "
                f"--ckpt_path last or delete {folder / CLAIM_NAME}"
            )
        if not (resuming or overwrite or restarting):
            where = "" if alive is False else f" (if it still runs on {info.get('host')}, choose another folder)"
            raise RunFolderError(
                f"{folder} holds a fit that was interrupted ({_describe(info)}){where}: resume it with --ckpt_path "
                f"last (or the path of one of its checkpoints), pass {flag} to start over, or choose another folder"
            )
        if alive is None:
            print(f"warning: taking over the claim on {folder} of {_describe(info)}, which cannot be checked from "
                  "this host", file=sys.stderr)
    if resuming or overwrite:
        return
    if (folder / "results.json").exists():
        raise ResultsExistError(
            f"{folder / 'results.json'} already exists: a finished run is never overwritten silently. Choose another "
            f"output folder, resume it with --ckpt_path last to train it further, or pass {flag}"
        )
    leftovers = _leftovers(folder)
    if leftovers and not restarting:
        raise RunFolderError(
            f"{folder} holds files of a run that did not finish ({', '.join(leftovers)}): resume it with --ckpt_path "
            f"last (or the path of one of its checkpoints), pass {flag} to start over, or choose another folder"
        )


def claim_folder(folder: str | Path, resuming: bool, overwrite: bool, flag: str = "--budget.overwrite true",
                 restarting: bool = False, about: dict | None = None) -> Claim:
    """Check ``folder`` (see ``check_folder``, same arguments), then claim it atomically; the claim's write is the
    check that the folder is writable, made before any training. ``about`` is stored in the claim (what a later
    command resuming the run must agree with, e.g. ``editing evaluate``'s settings).

    Raises:
        RunFolderError: the folder is in use, holds an unfinished run, or cannot be written.
        ResultsExistError: a finished run is in it.
    """
    folder = Path(folder)
    check_folder(folder, resuming, overwrite, flag, restarting)
    path = folder / CLAIM_NAME
    info = {**_my_identity(), "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": sys.argv, "token": os.urandom(8).hex(), **({"about": about} if about is not None else {})}
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(
            f"cannot write into the run folder {folder}: cannot create it ({err.strerror or err}). Training was not "
            "started; choose a writable folder (--budget.output_dir, --trainer.logger.init_args.save_dir)"
        ) from None
    def move_stale_claim_aside() -> None:
        if read_claim(folder) is not None:  # check_folder allowed taking it over: move it aside, then claim as usual
            aside = folder / f".{CLAIM_NAME}.stale-{info['token']}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, aside)
                with contextlib.suppress(OSError):
                    aside.unlink()

    try:
        # of two fits claiming at once exactly one succeeds, and the claim appears with its content complete
        create_exclusive(path, json.dumps(info, indent=2) + "\n", before=move_stale_claim_aside)
    except FileExistsError:
        held = read_claim(folder) or {}
        raise RunFolderError(f"{folder} was claimed by another fit a moment ago ({_describe(held)}); choose another "
                             "output folder") from None
    except OSError as err:
        raise RunFolderError(
            f"cannot write into the run folder {folder}: {err.strerror or err}. Training was not started; choose a "
            "writable folder with free space (--budget.output_dir, --trainer.logger.init_args.save_dir)"
        ) from None
    if overwrite and not resuming:
        clear_previous_run(folder)
    return Claim(path, info)


def clear_previous_run(folder: str | Path) -> list[str]:
    """Delete the files an earlier run left in ``folder`` (results, ball edits, metrics log, checkpoints), so that
    a run started with overwrite does not mix with them (``--ckpt_path last`` would otherwise find the old run's
    checkpoints). Only files a fit writes are touched.

    Returns:
        The names removed.
    """
    folder = Path(folder)
    removed = []
    for name in ("results.json", "metrics.csv", "hparams.yaml"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(name)
    for path in [*folder.glob("edits/ball_*"), *folder.glob("checkpoints/*.ckpt"), *folder.glob(PARTIAL_DIR)]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(str(path.relative_to(folder)))
    return removed


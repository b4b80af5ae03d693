"""What a command keeps when it is interrupted, and the one line that says so.

Two signals stop a command: Ctrl-C (SIGINT) and SIGTERM, which schedulers such as SLURM send before they preempt a
job. ``install`` makes SIGTERM raise ``Interrupted`` as Ctrl-C raises ``KeyboardInterrupt`` (of which ``Interrupted``
is a kind, so that code cleaning up after Ctrl-C also cleans up after SIGTERM); ``editing.cli.main`` turns either
into one line, ``interrupted by ...: <what was kept>; resume with: editing <command>``, and exits with 128 + the
signal's number. A command says what it keeps as it goes with ``keep`` (the fit: its checkpoint; evaluate: its
finished tasks), and how it resumes when that is not the same command line again.

A third signal asks without interrupting: SIGUSR1 (``SOFT_STOP``), which ``editing auto`` sends a trial's fit when
the trial's time share ends. ``install`` records it (``soft_stop_requested``); the fit then stops at its next epoch
boundary, after that epoch's evaluation, and writes its results as usual (``callbacks.degradation_budget``).

A leaf module (standard library only): every layer may report its progress.
"""

from __future__ import annotations

import atexit
import shlex
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal.

    Args:
        signum: the signal (SIGINT or SIGTERM).
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(SIGNAL_NAMES.get(signum, f"signal {signum}"))
        self.signum = int(signum)


@dataclass
class Kept:
    """What an interruption now leaves behind, and how the command resumes.

    Args:
        what: e.g. ``the checkpoint runs/x/checkpoints/last.ckpt (epochs 0..2 evaluated)``.
        resume: the arguments (after ``editing``) that resume; None: the command line again.
    """

    what: str
    resume: list[str] | None = None


_KEPT: list[Kept] = []


def keep(what: str, resume: Sequence[str] | None = None) -> None:
    """Record what an interruption of this command would now keep (replacing the earlier record)."""
    _KEPT[:] = [Kept(what, None if resume is None else [str(a) for a in resume])]


def kept() -> Kept | None:
    """The latest ``keep`` record (None: the command recorded nothing)."""
    return _KEPT[0] if _KEPT else None


def forget() -> None:
    """Drop the record (a command starting in this process, e.g. a test calling ``main`` twice)."""
    _KEPT.clear()


def signal_of(err: BaseException) -> int:
    """The signal behind an interruption (``KeyboardInterrupt``: Ctrl-C)."""
    return getattr(err, "signum", signal.SIGINT)


def exit_code(err: BaseException) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signal_of(err)


def message(command: str, args: Sequence[str], err: BaseException) -> str:
    """The one line an interrupted command prints."""
    record = kept()
    how = SIGNAL_NAMES.get(signal_of(err), f"signal {signal_of(err)}")
    resume = shlex.join(["editing", *command.split(), *args]) if record is None or record.resume is None else \
        shlex.join(["editing", *record.resume])
    what = record.what if record is not None else "what it had written is kept"
    return f"interrupted by {how}: {what}; resume with: {resume}"


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


SOFT_STOP = signal.SIGUSR1
"""The signal asking a fit to stop at its next epoch boundary (a time share ended), not to stop now."""
_SOFT_STOP: list[bool] = [False]


def _record_soft_stop(signum: int, frame) -> None:
    _SOFT_STOP[0] = True
    # asked once is enough; the sender repeats it until the process ends, and Python's shutdown would restore the
    # default action (ending the process) for a signal it handles, but not for one it ignores
    signal.signal(SOFT_STOP, signal.SIG_IGN)


def soft_stop_requested() -> bool:
    """Whether this process was asked (``SOFT_STOP``) to stop at its next epoch boundary."""
    return _SOFT_STOP[0]


def request_soft_stop(requested: bool = True) -> None:
    """Record (or, with False, forget) a request to stop at the next epoch boundary, as ``SOFT_STOP`` does."""
    _SOFT_STOP[0] = requested


def install() -> None:
    """SIGTERM raises ``Interrupted`` (in the main thread; a SIGTERM the process was started to ignore stays
    ignored). Ctrl-C keeps Python's ``KeyboardInterrupt``. ``SOFT_STOP`` is recorded (``soft_stop_requested``),
    also when the process was started ignoring it: ``editing auto`` starts its fits so, so that a request arriving
    before this runs is dropped (and sent again) instead of killing the fit."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(SOFT_STOP, _record_soft_stop)
    atexit.register(signal.signal, SOFT_STOP, signal.SIG_IGN)  # a request arriving while the process exits

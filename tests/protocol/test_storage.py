"""The SQLite file of a study under workers that start together (the CI failure of stop 41: one of three workers
got "database is locked" while switching a new file to WAL)."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from editing.core.errors import ConfigError
from editing.protocol import storage


def test_workers_starting_together_all_open_a_new_file_in_wal(tmp_path) -> None:
    """Six workers open each of 40 new files at the same instant; none is refused, each file ends in WAL.

    Before the fix, 3 of 40 such starts had a refused worker on this machine (SQLite refuses the second of two
    shared-lock upgrades at once, without waiting out the busy timeout)."""
    refused = []
    for rep in range(40):
        url = f"sqlite:///{tmp_path / f'{rep}' / 'study.db'}"
        barrier = threading.Barrier(6)

        def worker(url=url, barrier=barrier) -> None:
            barrier.wait()
            try:
                storage._prepare_sqlite(url)
            except ConfigError as err:
                refused.append(err)

        threads = [threading.Thread(target=worker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        with sqlite3.connect(tmp_path / f"{rep}" / "study.db") as con:
            assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert not refused


class _LockedTwice:
    """A connection factory whose first two connections find the file locked."""

    def __init__(self) -> None:
        self.calls = 0
        self.real = sqlite3.connect

    def __call__(self, path, timeout):
        self.calls += 1
        if self.calls <= 2:
            class Locked:
                def execute(self, sql):
                    raise sqlite3.OperationalError("database is locked")

                def close(self):
                    pass
            return Locked()
        return self.real(path, timeout=timeout)


def test_a_locked_file_is_retried_until_it_frees(tmp_path, monkeypatch) -> None:
    factory = _LockedTwice()
    monkeypatch.setattr(storage.sqlite3, "connect", factory)
    storage._prepare_sqlite(f"sqlite:///{tmp_path / 'study.db'}")
    assert factory.calls == 3
    monkeypatch.setattr(storage.sqlite3, "connect", factory.real)
    with sqlite3.connect(tmp_path / "study.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_locked_past_the_patience_is_a_clear_error(tmp_path, monkeypatch) -> None:
    factory = _LockedTwice()
    factory.calls = -10**6  # locked for good
    monkeypatch.setattr(storage.sqlite3, "connect", factory)
    monkeypatch.setattr(storage, "SQLITE_PATIENCE", 0.3)
    with pytest.raises(ConfigError, match=r"study\.db.*database is locked.*--root or --storage"):
        storage._prepare_sqlite(f"sqlite:///{tmp_path / 'study.db'}")

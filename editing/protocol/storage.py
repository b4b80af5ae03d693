"""Optuna storage of the sweeps: a study's name and default SQLite file under the sweep root, the checks that a
``--storage`` URL is usable before anything connects, and creating, joining or opening a study."""

from __future__ import annotations

import re
import sqlite3
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from editing.core.errors import ConfigError
from editing.protocol.space import make_sampler

if TYPE_CHECKING:
    from editing.protocol.sweep import SweepDefinition

DEFAULT_ROOT = "runs/sweeps"


def study_name_for(task: str, model: str, method: str) -> str:
    """Default study name ``<task>-<model>-<method>`` (characters outside [\\w.-] become ``_``)."""
    return re.sub(r"[^\w.-]+", "_", f"{Path(task).stem}-{model}-{method}")


def default_storage(root: str | Path, study: str) -> str:
    """The SQLite file of a study under the sweep root."""
    return f"sqlite:///{(Path(root) / study / 'study.db').resolve()}"


STORAGE_EXAMPLES = ("e.g. sqlite:////abs/path/study.db or postgresql+psycopg2://user:password@host:5432/db, or leave "
                    "--storage out for the SQLite file under --root")
SQLITE_PATIENCE = 60.0  # seconds a worker waits for another to release a SQLite file before it gives up
CONNECT_TIMEOUT = 10  # seconds: an unreachable database server is reported at once, not after minutes of retries


def check_storage_url(url: str):
    """Parse a ``--storage`` URL and check its database driver is installed, before anything connects.

    Args:
        url: a SQLAlchemy URL.

    Returns:
        The parsed ``sqlalchemy.engine.URL``.

    Raises:
        ConfigError: not a URL, an unknown database kind, a driver that is not installed, or an in-memory SQLite
            database (a sweep's trials would vanish with the process).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--storage {url!r} is not a database URL; {STORAGE_EXAMPLES}") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"--storage {shown!r}: unknown database kind {parsed.drivername!r}; "
                          f"{STORAGE_EXAMPLES}") from None
    try:
        dialect.import_dbapi()
    except ImportError as err:
        raise ConfigError(f"--storage {shown!r}: the {parsed.drivername} driver is not installed ({err}); install it "
                          "(PostgreSQL: pip install -e '.[postgres]' and write postgresql+psycopg2://...)") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigError(f"--storage {shown!r} is an in-memory database, which dies with the process; give a file, "
                          f"{STORAGE_EXAMPLES}")
    return parsed


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def _prepare_sqlite(url: str, create: bool = True) -> None:
    """Create the folder of a SQLite study and switch the file to WAL, so that readers do not block the writer of
    another worker (the setting is stored in the file; WAL needs a local filesystem, use PostgreSQL across
    machines). With ``create`` false a missing file is an error, and nothing is created."""
    path = _sqlite_path(url)
    if path is None:
        return
    if not create:
        if not path.is_file():
            raise ConfigError(f"--storage {url!r}: the database file {path} does not exist (check the path; a sweep "
                              "creates it)")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _switch_to_wal(path)
    except (OSError, sqlite3.Error) as err:
        raise ConfigError(f"--storage {url!r}: cannot create or open the SQLite file {path} ({err}); choose a "
                          "writable place (--root or --storage)") from None


def _switch_to_wal(path: Path) -> None:
    """Set WAL on ``path`` unless it is set already, retrying while other workers hold the file.

    SQLite answers "database is locked" at once, without waiting out the busy timeout, when two connections both
    try to upgrade their shared lock to change the journal mode (waiting could deadlock), so several workers
    starting together need the retry; a worker that finds WAL already set takes no write lock at all.
    """
    patience = SQLITE_PATIENCE
    deadline = time.monotonic() + patience
    delay = 0.05
    while True:
        con = sqlite3.connect(path, timeout=patience)
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err) or time.monotonic() > deadline:
                raise
        finally:
            con.close()
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _probe(url: str, engine_kwargs: dict) -> None:
    """Connect once, with a short timeout, so that a wrong host, port or password is reported at once."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        shown = engine.url.render_as_string(hide_password=True)
        raise ConfigError(f"--storage {shown!r}: cannot connect to the database ({reason}); check the host, port, "
                          "user, password and database name, and that the server is running") from None
    finally:
        engine.dispose()


def retry_callback():
    """Re-queues a dead worker's trial (same configuration) as a WAITING trial, at most 3 times."""
    from optuna import storages

    cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    with warnings.catch_warnings():  # "experimental" in optuna since 2.8; relied upon, as heartbeats (make_storage)
        warnings.simplefilter("ignore")
        return cls(max_retry=3)


def make_storage(url: str, heartbeat_interval: int | None = 60, grace_period: int | None = None,
                 create: bool = True):
    """An optuna RDBStorage with heartbeats: a trial whose worker stops beating for ``grace_period`` seconds is
    marked FAIL and re-queued with the same configuration.

    The URL is checked first (``check_storage_url``) and the database connected to once with a
    ``CONNECT_TIMEOUT``-second timeout, so a bad URL or an unreachable server fails at once with a clear message.

    Args:
        url: SQLAlchemy URL (``sqlite:///file.db``, ``postgresql+psycopg2://user:pw@host/db``).
        heartbeat_interval: seconds between heartbeats of a running trial (None: no heartbeats).
        grace_period: seconds without a heartbeat before a trial counts as dead (default 3 x interval).
        create: create a missing SQLite file (false for commands that only read a study).
    """
    import optuna
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, OperationalError

    parsed = check_storage_url(url)
    _prepare_sqlite(url, create)
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
        if parsed.get_backend_name() in ("postgresql", "mysql", "mariadb"):
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    _probe(url, engine_kwargs)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict = {}
    if heartbeat_interval:
        kwargs = {"heartbeat_interval": heartbeat_interval,
                  "grace_period": grace_period or 3 * heartbeat_interval,
                  "heartbeat_stale_trial_callback": retry_callback()}
    last: Exception | None = None
    for attempt in range(10):  # two workers creating the tables of a new database at once may collide: retry
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna since 2.9; we rely on them
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (IntegrityError, OperationalError) as err:  # the collision; anything else fails at once below
            last = err
            time.sleep(0.5 + attempt)
        except Exception as err:  # noqa: BLE001 - reported with the URL, not as a SQLAlchemy traceback
            last = err
            break
    reason = str(getattr(last, "orig", None) or last).strip().splitlines()[0]
    raise ConfigError(f"--storage {parsed.render_as_string(hide_password=True)!r}: the optuna tables cannot be created "
                      f"or read ({type(last).__name__}: {reason}); check the user's rights on the database, or "
                      "use another database") from last


def open_study(storage, name: str, definition: SweepDefinition | None = None, seed: int = 0):
    """Create or join study ``name``; a joining worker's definition must equal the stored one.

    Args:
        storage: an optuna storage.
        name: the study name.
        definition: the sweep this worker runs (None: only read the study, which must exist).
        seed: the sampler seed (the definition's seed when given).
    """
    import optuna

    if definition is None:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            known = sorted(optuna.get_all_study_names(storage))
            raise ConfigError(f"no study {name!r} in this storage (its studies: {', '.join(known) or 'none'}); check "
                              "--study_name, or start the sweep with `editing sweep`") from None
        sweep = study.user_attrs.get("sweep") or {}
        study.sampler = make_sampler(sweep.get("seed", seed))
        return study
    last: Exception | None = None
    for attempt in range(10):
        try:
            study = optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                        sampler=make_sampler(definition.seed), load_if_exists=True)
            break
        except Exception as err:  # noqa: BLE001 - concurrent creation of the same study: retry, then re-raise
            last = err
            time.sleep(0.5 + attempt)
    else:
        raise last  # type: ignore[misc]
    stored = study.user_attrs.get("sweep")
    mine = definition.to_dict()
    if stored is None:
        study.set_user_attr("sweep", mine)
        stored = mine
    if stored != mine:
        diff = sorted(k for k in mine if stored.get(k) != mine[k])
        raise ConfigError(f"study {name!r} was started with other settings ({', '.join(diff)} differ); join it "
                          f"with the same settings, or use another --study_name")
    return study


def open_existing_study(study_name: str, root: str = DEFAULT_ROOT, storage: str | None = None):
    """Open a study for reading; creates nothing (an unknown study is an error listing the known ones)."""
    if storage is None:
        db = Path(root) / study_name / "study.db"
        if not db.is_file():
            known = study_names(root)
            raise ConfigError(f"no sweep {study_name!r} under {root} (no {db}); sweeps there: "
                              f"{', '.join(known) or 'none'}. Check --study_name and --root, or start one with "
                              "`editing sweep`")
    return open_study(make_storage(storage or default_storage(root, study_name), None, create=False), study_name)


def study_names(root: str = DEFAULT_ROOT, storage: str | None = None) -> list[str]:
    """The sweeps in a storage (every study made by ``editing sweep``), or, without one, every
    ``<root>/<study>/study.db``."""
    import optuna

    if storage is None:
        return sorted(p.parent.name for p in Path(root).glob("*/study.db"))
    store = make_storage(storage, None, create=False)
    return sorted(s.study_name for s in optuna.get_all_study_summaries(store, include_best_trial=False)
                  if "sweep" in s.user_attrs)

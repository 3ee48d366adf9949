"""Optuna RDB storages shared by many processes: the search's studies and the benchmarks' sweeps.

One entry point, `open_storage(url)`. A PostgreSQL (or MySQL) URL gets Optuna's RDBStorage as it is: its
`SELECT ... FOR UPDATE` makes claiming a WAITING trial and failing a stale one atomic across machines. SQLite
ignores FOR UPDATE, and Python's sqlite3 opens a transaction only at the first write, so two processes can both
read a trial as WAITING and both claim it; on SQLite every transaction therefore starts with `BEGIN IMMEDIATE`
(it takes the write lock at once, so those read-then-write steps run one process at a time) and waits up to
`SQLITE_BUSY_TIMEOUT_S` for the lock. That is what makes "SQLite for the workers of one machine" hold.
"""

from __future__ import annotations

import logging
import time
import warnings

import optuna

from planner.errors import ArgumentError

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 60.0
# Workers starting together may race to create the schema of a fresh database (CREATE TABLE runs only where the
# table is missing, checked before): the losers see "already exists" and simply open it again.
OPEN_ATTEMPTS = 5


def open_storage(url: str | optuna.storages.BaseStorage, *, heartbeat_interval_s: int | None = None,
                 grace_period_s: int | None = None, max_retry: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` that several processes may use at once.

    With `heartbeat_interval_s`, a running trial records a heartbeat every that many seconds; one silent for
    `grace_period_s` (default 2 intervals) belongs to a dead worker: the next worker to look fails it and
    Optuna's `RetryHeartbeatStaleTrialCallback` puts a copy back in the queue (at most `max_retry` times).
    A storage object is returned unchanged."""
    if not isinstance(url, str):
        return url
    sqlite = url.startswith("sqlite")
    kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if sqlite else {}
    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = _rdb_storage(url, kwargs, heartbeat_interval_s, grace_period_s, max_retry)
            break
        except Exception as err:  # sqlalchemy's errors for a bad URL or a busy schema are many; name the input
            if attempt + 1 < OPEN_ATTEMPTS and _schema_race(err):
                time.sleep(0.2 * (attempt + 1))
                continue
            raise ArgumentError(f"storage {url!r} cannot be opened ({type(err).__name__}: {err}); give an Optuna RDB "
                             "URL such as 'sqlite:///memplan.db' or 'postgresql://user@host/db'") from err
    if sqlite:
        _serialize_sqlite(storage.engine)
    return storage


def _rdb_storage(url: str, engine_kwargs: dict, heartbeat_interval_s: int | None, grace_period_s: int | None,
                 max_retry: int | None) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():  # heartbeats and the retry callback are experimental in Optuna 5; we accept that
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = None
        if heartbeat_interval_s is not None:
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval_s,
                                          grace_period=grace_period_s, heartbeat_stale_trial_callback=callback)


def _schema_race(err: Exception) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("already exists", "database is locked", "duplicate key"))


def _serialize_sqlite(engine) -> None:
    """Every SQLite transaction begins with BEGIN IMMEDIATE (the SQLAlchemy recipe for pysqlite: turn off the
    driver's own lazy BEGIN, emit ours at the start of each transaction)."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while creating the schema predate the listeners

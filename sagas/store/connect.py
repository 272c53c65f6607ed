"""Connections to the saga store: one SQLAlchemy engine per process and URL, tuned per dialect.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (a commit survives any process crash; see
the README on power loss), and every write transaction begins ``IMMEDIATE`` so writers queue for
the lock up front instead of deadlocking on an upgrade. PostgreSQL pings a pooled connection only
when it sat idle (a ``SELECT 1`` per checkout would cost a round trip per transition).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.pool import NullPool

READ_ONLY = "sagas_read_only"
"""Execution option of a read transaction: on SQLite it begins without the write lock."""

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(UTC)


def input_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def get_engine(url: str, echo: bool = False) -> Engine:
    """One engine per process and URL: pools must never cross a fork."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        with _engines_lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _make_engine(url, echo)
                _engines[key] = engine
    return engine


def _make_engine(url: str, echo: bool) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, echo=echo, pool_size=5, max_overflow=5)
        _ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, echo=echo, poolclass=NullPool if parsed.database == ":memory:" else None,
        connect_args={"timeout": 60, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE), so two transitions never
        # deadlock upgrading a read lock; readers (Store.read) begin deferred and never wait
        # on, nor block, a writer in WAL mode. On the driver directly: exec_driver_sql cost
        # ~30 us of bookkeeping per transaction. A timeout still surfaces as OperationalError.
        statement = "BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
        dbapi_conn = conn.connection.dbapi_connection
        try:
            dbapi_conn.execute(statement)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                statement, (), exc, sqlite3.Error, dialect=conn.dialect
            ) from exc

    return engine


PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may sit unused before its next checkout pings the server."""


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping`` costs a round trip per transaction; ping only connections left idle.

    A connection back in use within a second was alive a second ago; an older one is pinged and,
    if dead, replaced (raising DisconnectionError makes the pool retry with a fresh one). Any
    disconnect SQLAlchemy detects still invalidates the whole pool.
    """

    @event.listens_for(engine, "checkin")
    def _mark_idle(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["sagas_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("sagas_idle_since")
        if since is not None and time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as exc:
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc




class WriterLock:
    """Writers of one SQLite file take turns in the kernel (``flock``), not in SQLite's busy loop.

    SQLite lets one writer in at a time; a writer that finds the file locked sleeps and polls
    (1, 2, 5, 10 ms ...), so two pool processes and a client writing at once lose whole
    milliseconds to sleeps. Taking an exclusive ``flock`` on a side file first makes the next
    writer wake the moment the previous one commits. Every writer of this engine takes it; one
    that does not (another program) is still serialised by SQLite itself, as before.
    """

    def __init__(self, database: str) -> None:
        self.path = f"{database}.writer-lock"
        self._local = threading.local()

    def _fd(self) -> int:
        held = getattr(self._local, "fd", None)
        if held is not None and held[0] == os.getpid():
            return int(held[1])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._local.fd = (os.getpid(), fd)  # per process and thread: flock is per open file
        return fd

    @contextmanager
    def held(self) -> Iterator[None]:
        fd = self._fd()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def writer_lock(url: str) -> WriterLock | None:
    """The writer lock of a SQLite file store; None for other databases and in-memory ones."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") \
            or database.startswith("file:"):
        return None
    return WriterLock(str(Path(database).resolve()))

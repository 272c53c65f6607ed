"""The domain's database access and the chaos switch its participants honour.

The order services share the saga store's database in this sample (one SQLite file by default),
but reach it through their own SQLAlchemy engine: a participant owns its database.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

from config.settings import get_app_settings
from sagas import TransientError

_engines: dict[tuple[int, str], Engine] = {}
_lock = threading.Lock()


def get_engine() -> Engine:
    """One engine per process and URL (pools never cross a fork)."""
    url = get_app_settings().database_url
    key = (os.getpid(), url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = _make_engine(url)
    return engine


def _make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=5, max_overflow=5, pool_pre_ping=True)
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # BEGIN IMMEDIATE below: writers queue, never deadlock
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA busy_timeout=60000")

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


@contextmanager
def transaction() -> Iterator[Connection]:
    with get_engine().begin() as conn:
        yield conn


def call_service(where: str) -> None:
    """The start of a participant's work: SERVICE_LATENCY, then perhaps a fault (chaos)."""
    latency = get_app_settings().service_latency
    if latency > 0:
        time.sleep(latency)
    maybe_fault(where)


def maybe_fault(where: str) -> None:
    """Chaos testing: a transient fault with probability FAULT_RATE (off by default)."""
    rate = get_app_settings().fault_rate
    if rate > 0 and random.random() < rate:
        raise TransientError(f"injected transient fault in {where}")

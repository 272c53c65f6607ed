"""Shared fixtures: real Redis, real databases (SQLite file and PostgreSQL), real workers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import (
    RedisServer,
    create_pg_database,
    drop_pg_database,
    postgres_reachable,
    require_service,
    start_redis,
)
from tests.support.workers import WorkerProcess

TEST_IMPORTS = "tests.support.test_sagas"

# A private Redis for the whole session, so tests never touch the machine's own.
_REDIS: RedisServer = start_redis()
os.environ["REDIS_URL"] = _REDIS.url
os.environ["SAGAS_IMPORTS"] = TEST_IMPORTS
os.environ["SAGAS_APP"] = "config"  # the sample app, for the CLI run as a subprocess
os.environ.setdefault("DATABASE_URL", "sqlite:////tmp/sagas-unit-placeholder.db")


def pytest_unconfigure(config: pytest.Config) -> None:
    _REDIS.stop()


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    return _REDIS


def use_database(url: str, redis_db: int = 0) -> None:
    """Point this process's sample engine (and its participants) at ``url``."""
    from config import engine
    from config.settings import get_app_settings

    os.environ["DATABASE_URL"] = url
    get_app_settings.cache_clear()
    engine.settings = engine.settings.model_copy(update={"database_url": url})


@dataclass
class Backend:
    kind: str
    database_url: str
    env: dict[str, str]
    workers: list[WorkerProcess]
    log_dir: Path

    def worker_log(self) -> str:
        return "\n".join(w.log() for w in self.workers)


def _worker_env(database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=_REDIS.url, DATABASE_URL=database_url, SAGAS_IMPORTS=TEST_IMPORTS,
        SAGAS_APP="config",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    return env


def _migrate() -> None:
    import tasks.migrate
    import tests.support.test_sagas  # noqa: F401
    from config import engine

    engine.upgrade_schema()
    tasks.migrate.upgrade()


@contextmanager
def fresh_database(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database of ``kind`` this process points at; PostgreSQL's is dropped after.

    PostgreSQL skips when unreachable, and fails the run under CI=true.
    """
    pg_name = None
    if kind == "postgresql":
        require_service(postgres_reachable(), "PostgreSQL at 127.0.0.1:5432")
        pg_name, url = create_pg_database()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite')}/sagas.db"
    use_database(url)
    _migrate()
    try:
        yield url
    finally:
        from sagas.store.connect import _engines

        for key in [k for k in _engines if k[1] == url]:
            _engines.pop(key).dispose()
        if pg_name:
            drop_pg_database(pg_name)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Backend]:
    """A migrated database of each kind with a real worker serving every queue."""
    with fresh_database(request.param, tmp_path_factory) as url:
        log_dir = tmp_path_factory.mktemp(f"logs-{request.param}")
        worker = WorkerProcess(_worker_env(url), concurrency=4, name=request.param,
                               log_dir=log_dir).start()
        try:
            worker.wait_ready()
            yield Backend(request.param, url, _worker_env(url), [worker], log_dir)
        finally:
            worker.stop()


@pytest.fixture
def engine_backend(backend: Backend) -> Backend:
    """Re-point this process at the backend (tests of two kinds interleave per session)."""
    use_database(backend.database_url)
    return backend


def wait_for_saga(saga_id: str, states: set[str] | None = None, timeout: float = 30
                  ) -> dict[str, Any]:
    """Poll the store until the saga reaches one of ``states`` (default: settled)."""
    from tests.support.engine import get_store

    wanted = states or {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED"}
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            view = get_store().get_view(saga_id)
        except Exception:
            view = {}
        if view.get("state") in wanted:
            return view
        time.sleep(0.05)
    raise AssertionError(f"saga {saga_id} not in {wanted} after {timeout}s: {view}")

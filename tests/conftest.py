"""Shared fixtures: real Redis, real databases (SQLite file and PostgreSQL), real workers.

The broker is the session's private Redis, or with ``SAGAS_TEST_BROKER=rabbitmq`` a RabbitMQ
vhost of the session's own on the machine's server (the result backend stays the private
Redis, as in production). Without a reachable RabbitMQ that session's tests skip, and fail
under CI=true.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.support.services import (
    AMQP_URL,
    RabbitVhost,
    RedisServer,
    broker_kind,
    create_pg_database,
    create_vhost,
    drop_pg_database,
    postgres_reachable,
    rabbitmq_reachable,
    require_service,
    start_redis,
)
from tests.support.workers import WorkerProcess

TEST_IMPORTS = "tests.support.test_sagas"

TEST_BROKER = broker_kind()
ON_RABBITMQ = TEST_BROKER == "rabbitmq"
# The stores the ``backend`` scenarios run on; SAGAS_TEST_DATABASES=sqlite narrows a pass (the
# RabbitMQ pass of `make test` runs on SQLite only: the stores are covered by the Redis pass).
DATABASES = [d.strip() for d in os.environ.get("SAGAS_TEST_DATABASES",
                                               "sqlite,postgresql").split(",") if d.strip()]
if not set(DATABASES) <= {"sqlite", "postgresql"} or not DATABASES:
    raise pytest.UsageError(f"SAGAS_TEST_DATABASES={DATABASES}: sqlite and/or postgresql")

# A private Redis for the whole session, so tests never touch the machine's own.
_REDIS: RedisServer = start_redis()
os.environ["REDIS_URL"] = _REDIS.url
os.environ["SAGAS_IMPORTS"] = TEST_IMPORTS
os.environ["SAGAS_APP"] = "config"  # the sample app, for the CLI run as a subprocess
os.environ.setdefault("DATABASE_URL", "sqlite:////tmp/sagas-unit-placeholder.db")
os.environ.pop("BROKER_URL", None)  # never a broker from the shell: the session's own below
_VHOSTS: list[RabbitVhost] = []
_RABBITMQ_UP = ON_RABBITMQ and rabbitmq_reachable()
if _RABBITMQ_UP:
    _VHOSTS.append(create_vhost("session"))
    os.environ["BROKER_URL"] = _VHOSTS[0].url


def pytest_unconfigure(config: pytest.Config) -> None:
    _REDIS.stop()
    for vhost in _VHOSTS:
        vhost.delete()


def pytest_report_header(config: pytest.Config) -> str:
    return f"sagas broker: {os.environ.get('BROKER_URL') or _REDIS.url} ({TEST_BROKER})"


@pytest.fixture(scope="session", autouse=True)
def _rabbitmq_when_asked() -> None:
    """SAGAS_TEST_BROKER=rabbitmq without a reachable RabbitMQ: skip, or fail under CI."""
    if ON_RABBITMQ:
        where = urlsplit(AMQP_URL)
        require_service(_RABBITMQ_UP, f"RabbitMQ at {where.hostname}:{where.port or 5672} "
                                      "(SAGAS_TEST_AMQP_URL, and rabbitmqctl to make vhosts)")


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    return _REDIS


def broker_url() -> str:
    """The session's broker: its RabbitMQ vhost, or its private Redis."""
    return os.environ.get("BROKER_URL") or _REDIS.url


def broker_down(port: int) -> dict[str, str]:
    """Environment overrides that point a process's broker at ``port``, where nothing listens:
    REDIS_URL on Redis (broker and result backend), BROKER_URL on RabbitMQ."""
    if ON_RABBITMQ:
        return {"BROKER_URL": f"amqp://guest:guest@127.0.0.1:{port}//"}
    return {"REDIS_URL": f"redis://127.0.0.1:{port}/0"}


def private_broker(label: str, redis_db: int) -> str:
    """A broker namespace no other test's workers consume: Redis database ``redis_db`` of the
    session's Redis, or on RabbitMQ a vhost of its own (deleted at the end of the session)."""
    if not ON_RABBITMQ:
        return _REDIS.url_db(redis_db)
    vhost = create_vhost(label)
    _VHOSTS.append(vhost)
    return vhost.url


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
        REDIS_URL=_REDIS.url, DATABASE_URL=database_url,
        SAGAS_IMPORTS=TEST_IMPORTS, SAGAS_APP="config",
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


@pytest.fixture(scope="session", params=DATABASES)
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

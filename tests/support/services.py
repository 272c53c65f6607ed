"""Real servers for tests: a private Redis per session, a throwaway PostgreSQL database."""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass

import pytest

from sagas.devtools.localredis import free_port, start_redis_server

PG_ADMIN_URL = os.environ.get(
    "SAGAS_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def require_service(ok: bool, what: str) -> None:
    """Skip locally when a server is missing; under CI a missing server fails the run."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is unreachable, and under CI=true that is a failure, not a skip")
    pytest.skip(f"{what} is unreachable")


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_db(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            self.process.wait(10)


def start_redis(port: int | None = None) -> RedisServer:
    port = port or free_port()
    return RedisServer(port, start_redis_server(port))


def postgres_reachable() -> bool:
    try:
        import psycopg

        url = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=2):
            return True
    except Exception:
        return False


def create_pg_database() -> tuple[str, str]:
    """A fresh database; returns (name, SQLAlchemy URL)."""
    import psycopg

    name = f"sagas_test_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    return name, f"{base}/{name}"


def drop_pg_database(name: str) -> None:
    import psycopg

    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

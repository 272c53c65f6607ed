"""Real servers for tests: a private Redis per session, a throwaway PostgreSQL database, a
throwaway RabbitMQ virtual host."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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


# --- RabbitMQ: the machine's server, one virtual host per use --------------------------------
# Tests never share the machine's vhosts: each session (and each private deployment) declares
# its queues in a vhost of its own, made with rabbitmqctl (as root, like the CI run) and
# deleted after. SAGAS_TEST_AMQP_URL names the server (guest/guest on 127.0.0.1:5672 here).
AMQP_URL = os.environ.get("SAGAS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
BROKERS = ("redis", "rabbitmq")


def broker_kind() -> str:
    """The broker the tests run on: ``SAGAS_TEST_BROKER`` (redis, the default, or rabbitmq)."""
    broker = os.environ.get("SAGAS_TEST_BROKER", "").strip().lower() or "redis"
    if broker not in BROKERS:
        raise ValueError(f"SAGAS_TEST_BROKER={broker!r}: use one of {', '.join(BROKERS)}")
    return broker


def _rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([ctl, "-q", *args], capture_output=True, text=True, check=check,
                          timeout=60)


def rabbitmq_reachable() -> bool:
    """The AMQP port answers and rabbitmqctl can make vhosts on that server."""
    parts = urlsplit(AMQP_URL)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            pass
        return _rabbitmqctl("list_vhosts", check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class RabbitVhost:
    name: str

    @property
    def url(self) -> str:
        return f"{AMQP_URL.rstrip('/')}/{self.name}"

    def lose_everything(self, *queues: str) -> None:
        """The broker drops every client and every message of ``queues``, queued or held
        unacknowledged: the user is locked out of the vhost (reconnecting clients are refused),
        every connection is closed by the server (what consumers held goes back to the queues),
        the queues are purged, and the user is let back in. Durable queues survive a real
        RabbitMQ restart, so this is harsher than one: what a lost node does to its queues."""
        user = urlsplit(AMQP_URL).username or "guest"
        _rabbitmqctl("clear_permissions", "-p", self.name, user, check=False)
        try:
            _rabbitmqctl("close_all_connections", "-p", self.name, "--limit", "100000",
                         "test: the broker lost everything", check=False)
            for queue in queues:  # as the administrator: the user may not, right now
                _rabbitmqctl("purge_queue", "-p", self.name, queue, check=False)
        finally:
            _rabbitmqctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")

    def depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (0 when it does not exist)."""
        from amqp.exceptions import NotFound
        from kombu import Connection

        with Connection(self.url, connect_timeout=5) as conn:
            channel = conn.channel()
            try:
                return int(channel.queue_declare(queue, passive=True).message_count)
            except NotFound:
                return 0

    def delete(self) -> None:
        _rabbitmqctl("delete_vhost", self.name, check=False)


def create_vhost(label: str = "t") -> RabbitVhost:
    """A fresh vhost the AMQP URL's user may use fully; ``delete()`` it after."""
    user = urlsplit(AMQP_URL).username or "guest"
    vhost = RabbitVhost(f"sagas-test-{label}-{uuid.uuid4().hex[:8]}")
    _rabbitmqctl("add_vhost", vhost.name)
    _rabbitmqctl("set_permissions", "-p", vhost.name, user, ".*", ".*", ".*")
    return vhost


def peek_queue(broker_url: str, queue: str) -> list[tuple[dict[str, Any], Any]]:
    """The messages waiting in ``queue``, oldest first, as (headers, decoded body); left there.

    On Redis the list is read as it is; on RabbitMQ every message is fetched unacknowledged and
    handed back (requeued in place) when the channel closes.
    """
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        out = []
        for raw in reversed(client.lrange(queue, 0, -1)):  # LPUSHed: newest first
            message = json.loads(raw)
            out.append((message["headers"], json.loads(base64.b64decode(message["body"]))))
        return out
    from amqp.exceptions import NotFound
    from kombu import Connection

    out = []
    with Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            while (message := channel.basic_get(queue, no_ack=False)) is not None:
                headers = dict(message.properties.get("application_headers") or {})
                out.append((headers, json.loads(message.body)))
        except NotFound:
            pass
        finally:
            with contextlib.suppress(Exception):
                channel.close()  # nothing acknowledged: all of them go back
    return out


def drop_from_queue(broker_url: str, queue: str, task_id_prefix: str) -> int:
    """Remove the messages whose task id begins with ``task_id_prefix`` from ``queue`` (as a
    worker that took them and died would); the others stay. Returns how many went."""
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        gone = 0
        for raw in client.lrange(queue, 0, -1):
            if str(json.loads(raw)["headers"]["id"]).startswith(task_id_prefix):
                gone += int(client.lrem(queue, 0, raw))
        return gone
    from amqp.exceptions import NotFound
    from kombu import Connection

    gone = 0
    with Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.channel()
        try:
            while (message := channel.basic_get(queue, no_ack=False)) is not None:
                headers = dict(message.properties.get("application_headers") or {})
                if str(headers.get("id", "")).startswith(task_id_prefix):
                    channel.basic_ack(message.delivery_tag)
                    gone += 1
        except NotFound:
            pass
        finally:
            with contextlib.suppress(Exception):
                channel.close()  # the others were not acknowledged: they go back
    return gone


def consumer_timeout_s() -> float | None:
    """The RabbitMQ server's ``consumer_timeout`` in seconds (None: not limited)."""
    out = _rabbitmqctl("eval", "application:get_env(rabbit, consumer_timeout).").stdout.strip()
    found = re.fullmatch(r"\{ok,(\d+)\}", out)
    return int(found.group(1)) / 1000 if found else None

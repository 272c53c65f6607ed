"""The bench's own Celery app: the same three trivial steps run as a saga and as a raw chain.

A tool built on the public binding only, like any application: its own ``Celery("bench")``
configured as a production app would be (JSON, late acks, prefetch 1), ``Sagas(app, settings)``
with settings from the environment (``DATABASE_URL``, ``REDIS_URL``, ``BROKER_URL``), plain
``@app.task`` steps the engine wraps itself, and the saga registered with ``engine.register``.
Its workers run ``celery -A bench.app worker -Q bench,saga``. The raw variant calls the very
same tasks as a plain ``chain``: any difference in the figures is the engine's cost, not the
tasks'.

Measurement hooks are installed only when ``SAGAS_BENCH_DIR`` is set (workers the bench starts):
- the last task of a saga or chain pushes ``"<key>|<monotonic time>"`` to a Redis list, after
  the saga's final transition has been committed (``task_postrun`` runs after ``__call__``);
- every SQL statement, commit and row written is counted into a per-process memory-mapped file
  the bench reads, so counting costs no round trip and never perturbs the timing it measures.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from pathlib import Path
from typing import Any

from celery import Celery, chain
from celery.signals import task_postrun

from sagas import BusinessError, RetryPolicy, Saga, Sagas, SagaSettings, Step

QUEUE = "bench"
DONE_KEY = "bench:done"
NO_RETRY = RetryPolicy(attempts=1, jitter=False)

settings = SagaSettings()  # DATABASE_URL, REDIS_URL, BROKER_URL, ... from the environment

app = Celery("bench", broker=settings.broker_url, backend=settings.redis_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_default_queue=settings.saga_queue,
    # Results are not read on the happy path; failures are stored for the failure handler.
    task_ignore_result=True,
    task_store_errors_even_if_ignored=True,
    result_expires=7 * 24 * 3600,
    # At-least-once delivery, one message at a time per pool process, as the sample runs.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_retry_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={"visibility_timeout": 3600},
    result_backend_transport_options={"retry_policy": {"timeout": 5.0}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    timezone="UTC",
)

engine = Sagas(app, settings)


def point_at(redis_url: str, database_url: str, broker_url: str | None = None) -> None:
    """Re-point this process's app and engine (the bench may have imported it before choosing
    its private Redis and database); workers get them from the environment instead. ``sagas
    bench`` passes no ``broker_url``: it counts broker messages in its Redis, the broker."""
    broker_url = broker_url or redis_url
    current = engine.settings
    wanted = (redis_url, broker_url, database_url)
    if (current.redis_url, current.broker_url, current.database_url) != wanted:
        engine.settings = current.model_copy(
            update={"redis_url": redis_url, "broker_url": broker_url, "database_url": database_url}
        )
    app.conf.broker_url = broker_url
    app.conf.result_backend = redis_url


def _payload(arg: dict[str, Any]) -> dict[str, Any]:
    """The saga input when called as a step, the previous result when called in a chain."""
    return arg["input"] if "saga_id" in arg and "input" in arg else arg


def _carry(arg: dict[str, Any]) -> dict[str, Any]:
    payload = _payload(arg)
    return {"key": payload.get("key"), "fail": bool(payload.get("fail"))}


@app.task(name="bench.reserve", queue=QUEUE)
def reserve(arg: dict[str, Any]) -> dict[str, Any]:
    return _carry(arg)


@app.task(name="bench.charge", queue=QUEUE)
def charge(arg: dict[str, Any]) -> dict[str, Any]:
    return _carry(arg)


@app.task(name="bench.ship", queue=QUEUE)
def ship(arg: dict[str, Any]) -> dict[str, Any]:
    out = _carry(arg)
    if out["fail"]:
        raise BusinessError("bench: planned failure of the last step")
    return out


@app.task(name="bench.refund", queue=QUEUE)
def refund(arg: dict[str, Any]) -> dict[str, Any]:
    return _carry(arg)


@app.task(name="bench.release", queue=QUEUE)
def release(arg: dict[str, Any]) -> dict[str, Any]:
    return _carry(arg)


@app.task(name="bench.raw_failed", queue=settings.saga_queue, bind=True)
def raw_failed(self: Any, task_id: str, payload: dict[str, Any]) -> None:
    """The raw chain's errback (sent as a message): enqueue the two compensations, newest first."""
    chain(refund.s(payload), release.s()).apply_async()


bench_saga = engine.register(Saga(
    "bench",
    steps=[
        Step("reserve", action=reserve, compensation=release, queue=QUEUE, retry=NO_RETRY),
        Step("charge", action=charge, compensation=refund, queue=QUEUE, retry=NO_RETRY),
        Step("ship", action=ship, queue=QUEUE, retry=NO_RETRY),
    ],
))

# The same saga under semantic locks, a distinct key per saga: what locks cost when no two
# sagas ever wait on each other (``sagas bench --locks``).
bench_locked_saga = engine.register(Saga(
    "bench_locked",
    steps=[
        Step("reserve", action=reserve, compensation=release, queue=QUEUE, retry=NO_RETRY),
        Step("charge", action=charge, compensation=refund, queue=QUEUE, retry=NO_RETRY),
        Step("ship", action=ship, queue=QUEUE, retry=NO_RETRY),
    ],
    locks=lambda data: [f"bench:{data['key']}"],
))


def raw_chain(payload: dict[str, Any]) -> Any:
    """The floor: the same three tasks as a plain Celery chain, errback like ours on saga queue."""
    c = chain(reserve.s(payload), charge.s(), ship.s())
    if payload.get("fail"):
        c = c.on_error(raw_failed.s(payload))
    return c


# --- measurement hooks (only in workers the bench starts) -----------------------------------

_LAST_TASKS = {"bench.ship", "bench.release"}
_SLOT = struct.Struct("<qqq")  # statements, commits, rows written
_counter: dict[str, Any] = {"pid": None, "map": None, "stmts": 0, "commits": 0, "rows": 0}
_redis: Any = None


def _stats_map() -> mmap.mmap:
    """This process's counter file; re-created after a fork so children never share a slot."""
    if _counter["pid"] != os.getpid():
        path = Path(os.environ["SAGAS_BENCH_DIR"]) / f"sql-{os.getpid()}.bin"
        with open(path, "wb+") as fh:
            fh.write(b"\0" * _SLOT.size)
            fh.flush()
            _counter["map"] = mmap.mmap(fh.fileno(), _SLOT.size)
        _counter.update(pid=os.getpid(), stmts=0, commits=0, rows=0)
    return _counter["map"]


def _on_statement(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
    if statement[:5].upper() == "BEGIN":
        return
    m = _stats_map()
    _counter["stmts"] += 1
    _SLOT.pack_into(m, 0, _counter["stmts"], _counter["commits"], _counter["rows"])


def rows_written(statement: str, rowcount: int) -> int:
    """Rows a statement wrote: the driver's rowcount for a plain INSERT, UPDATE or DELETE; for
    a ``WITH`` statement whose parts each write one row per row it returns (the engine's
    one-statement start and completion on PostgreSQL), rowcount times its writing parts."""
    head = statement.lstrip()[:6].upper()
    if head in ("INSERT", "UPDATE", "DELETE"):
        return max(rowcount, 0)
    if head.startswith("WITH"):
        text = statement.upper()
        return max(rowcount, 0) * (text.count("INSERT INTO") + text.count("UPDATE "))
    return 0


def _on_executed(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
    """Rows a write statement inserted, updated or deleted."""
    written = rows_written(statement, int(cursor.rowcount or 0))
    if not written:
        return
    m = _stats_map()
    _counter["rows"] += written
    _SLOT.pack_into(m, 0, _counter["stmts"], _counter["commits"], _counter["rows"])


def _on_commit(conn: Any) -> None:
    m = _stats_map()
    _counter["commits"] += 1
    _SLOT.pack_into(m, 0, _counter["stmts"], _counter["commits"], _counter["rows"])


def _marker(sender: Any = None, task: Any = None, args: Any = None, state: Any = None,
            **_: Any) -> None:
    global _redis
    name = getattr(task, "name", None)
    if name not in _LAST_TASKS or state != "SUCCESS" or not args:
        return
    arg = args[0]
    key = _payload(arg).get("key") if isinstance(arg, dict) else None
    if not key:
        return
    if name == "bench.ship" and _payload(arg).get("fail"):
        return
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(engine.settings.redis_url)
    _redis.rpush(DONE_KEY, f"{key}|{time.monotonic():.6f}")


def install_counters() -> None:
    """Count the SQL of this process (the bench client calls it for itself too).

    The listener is on SQLAlchemy's ``Engine`` class, not on ``engine.store.engine``: the store
    keeps one SQLAlchemy engine per process, so each prefork child builds its own after the
    fork, and a listener put on the main process's engine would never see the children's SQL.
    The saga store is the only database these processes use.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "before_cursor_execute", _on_statement):
        event.listen(Engine, "before_cursor_execute", _on_statement)
        event.listen(Engine, "after_cursor_execute", _on_executed)
        event.listen(Engine, "commit", _on_commit)


# The marker is cheap and only reacts to bench payloads, so running workers support the bench too.
task_postrun.connect(_marker, weak=False)
if os.environ.get("SAGAS_BENCH_DIR"):
    install_counters()

"""Transactional outbox: saga lifecycle events, written with the transition, relayed to a broker.

The store adds one batched INSERT to the transaction that records a transition, only when the
transition is a lifecycle event (saga started, step succeeded or failed, compensation done, saga
completed, compensated or parked). So an event exists if and only if its transition committed.

The relay publishes pending rows to the kombu topic exchange ``sagas.events`` with routing key
``<saga>.<event>`` (``order.step.succeeded``), at least once: a relay that dies mid-batch leaves
its rows pending and another relay sends them again, so consumers drop duplicates by the
event's ``id``. On PostgreSQL the batch is claimed ``FOR UPDATE SKIP LOCKED`` (several relays
share the work; a dead relay's locks vanish with its connection); on SQLite, whose writers
serialise, the batch is leased for a while instead, so the engine never waits on a publish.
A failed publish is retried with exponential backoff; after N attempts the row is ``dead``.

Run it: ``python -m sagas.outbox relay`` (the Procfile's ``relay`` entry).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    update,
)

from sagas.listeners import get_observability_settings
from sagas.models import Base, Id, db_now
from sagas.prepared import PreparedSet
from sagas.prepared import execute as run_prepared

log = logging.getLogger("sagas.outbox")

EXCHANGE = "sagas.events"
PENDING, SENT, DEAD = "pending", "sent", "dead"


def _define_table() -> Table:
    # ``python -m sagas.outbox`` imports this file twice (as __main__ and via the store): reuse.
    existing = Base.metadata.tables.get("saga_outbox")
    if existing is not None:
        return existing
    return Table(
        "saga_outbox", Base.metadata,
        Column("id", Id, primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),  # consumers dedupe by it
        Column("saga_id", String(64), nullable=False),  # no index: one B-tree less per write
        Column("saga", String(100), nullable=False),
        Column("event", String(64), nullable=False),
        Column("routing_key", String(255), nullable=False),
        Column("payload", JSON, nullable=False),
        Column("status", String(16), nullable=False, default=PENDING),
        Column("attempts", Integer, nullable=False, default=0),
        Column("available_at", DateTime(timezone=True), server_default=db_now(), nullable=False),
        Column("created_at", DateTime(timezone=True), server_default=db_now(), nullable=False),
        Column("sent_at", DateTime(timezone=True)),
        Column("last_error", Text),
        Index("ix_saga_outbox_status_available", "status", "available_at", "id"),
    )


outbox_t = _define_table()
_INSERT = insert(outbox_t)  # built once: the per-transition path only binds rows
_OUTBOX_COLUMNS = ("event_id", "saga_id", "saga", "event", "routing_key", "payload", "status",
                   "attempts")
_HOT = PreparedSet({"insert": (_INSERT, _OUTBOX_COLUMNS)})

_SAGA_EVENTS = {
    "COMPLETED": "saga.completed",
    "COMPENSATED": "saga.compensated",
    "COMPENSATION_FAILED": "saga.parked",
}
_STEP_EVENTS = {
    "SUCCEEDED": "step.succeeded",
    "FAILED": "step.failed",
    "COMPENSATED": "step.compensated",
    "COMPENSATION_FAILED": "step.compensation_failed",
}
EVENTS = ("saga.started", *_SAGA_EVENTS.values(), *_STEP_EVENTS.values())


def _utcnow() -> datetime:
    return datetime.now(UTC)


def lifecycle_event(step: str | None, from_state: Any, to_state: Any) -> str | None:
    """The outbox event name of a transition, or None when it is not a lifecycle event."""
    if step is None:
        if from_state == "PENDING" and to_state == "RUNNING":
            return "saga.started"
        return _SAGA_EVENTS.get(str(to_state))
    return _STEP_EVENTS.get(str(to_state))


def outbox_rows(snap: Any, decision: Any) -> list[dict[str, Any]]:
    """The rows a committed decision adds to the outbox (empty for bookkeeping moves)."""
    rows: list[dict[str, Any]] = []
    occurred = None
    for t in decision.transitions:
        name = lifecycle_event(t.step, t.from_state, t.to_state)
        if name is None:
            continue
        occurred = occurred or _utcnow().isoformat()
        event_id = str(uuid.uuid4())
        payload: dict[str, Any] = {
            "id": event_id, "event": name, "saga_id": snap.id, "saga": snap.name,
            "step": t.step, "from_state": None if t.from_state is None else str(t.from_state),
            "to_state": str(t.to_state), "attempt": t.attempt, "error": t.error,
            "saga_state": str(snap.state), "occurred_at": occurred,
        }
        if name == "saga.started":
            payload["input"] = snap.input
        elif name == "step.succeeded":
            payload["result"] = snap.steps[t.step].result
        rows.append({
            "event_id": event_id, "saga_id": snap.id, "saga": snap.name, "event": name,
            "routing_key": f"{snap.name}.{name}", "payload": payload,
            "status": PENDING, "attempts": 0,
        })
    return rows


def insert_outbox(conn: Connection, snap: Any, decision: Any) -> None:
    """Called by the store inside the transition's transaction: one INSERT, or nothing."""
    if not get_observability_settings().sagas_outbox:
        return
    rows = outbox_rows(snap, decision)
    if rows:
        run_prepared(conn, _HOT.get(conn, "insert"), rows)


# --- the relay -------------------------------------------------------------------------------
Publisher = Callable[[dict[str, Any]], None]


class KombuPublisher:
    """Publishes one outbox row to the topic exchange; reconnects after a broker error."""

    def __init__(self, url: str, exchange: str = EXCHANGE) -> None:
        from kombu import Exchange

        self.url = url
        self.exchange = Exchange(exchange, type="topic", durable=True)
        self._conn: Any = None
        self._producer: Any = None

    def _ensure(self) -> Any:
        if self._producer is None:
            from kombu import Connection as KombuConnection

            self._conn = KombuConnection(self.url, connect_timeout=5)
            self._conn.ensure_connection(max_retries=1)
            self._producer = self._conn.Producer(serializer="json")
            self.exchange(self._conn.default_channel).declare()
        return self._producer

    def __call__(self, row: dict[str, Any]) -> None:
        try:
            self._ensure().publish(
                row["payload"], exchange=self.exchange, routing_key=row["routing_key"],
                delivery_mode=2, retry=False,
                headers={"event_id": row["event_id"], "saga_id": row["saga_id"]},
            )
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.release()
        self._conn = self._producer = None


class Relay:
    """Moves pending outbox rows to the broker; safe to run several at once."""

    def __init__(
        self,
        store: Any = None,
        publisher: Publisher | None = None,
        *,
        batch: int | None = None,
        max_attempts: int | None = None,
        backoff: float = 1.0,
        backoff_max: float = 300.0,
        lease: float = 30.0,
        throttle: float = 0.0,
        retention: float | None = None,
    ) -> None:
        settings = get_observability_settings()
        if store is None:
            from sagas.runtime import get_store

            store = get_store()
        if publisher is None:
            from sagas.settings import get_settings

            publisher = KombuPublisher(settings.sagas_outbox_broker_url or get_settings().redis_url)
        self.store = store
        self.publisher = publisher
        self.batch = batch or settings.sagas_outbox_batch
        self.max_attempts = max_attempts or settings.sagas_outbox_max_attempts
        self.backoff, self.backoff_max = backoff, backoff_max
        self.lease = lease
        self.throttle = throttle
        self.retention = settings.sagas_outbox_retention if retention is None else retention
        self._last_cleanup = 0.0

    def delay(self, attempts: int) -> float:
        """Backoff before the next try after ``attempts`` failed ones (jittered)."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** max(0, attempts - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _claim_query(self, now: datetime) -> Any:
        return (
            select(outbox_t.c.id, outbox_t.c.event_id, outbox_t.c.saga_id,
                   outbox_t.c.routing_key, outbox_t.c.payload, outbox_t.c.attempts)
            .where(outbox_t.c.status == PENDING, outbox_t.c.available_at <= now)
            .order_by(outbox_t.c.id)
            .limit(self.batch)
        )

    def run_once(self) -> int:
        """Publish one batch; returns how many rows it settled (sent, retried or dead)."""
        done = self._run_locked() if self.store.dialect == "postgresql" else self._run_leased()
        self._cleanup()
        return done

    def _run_locked(self) -> int:
        with self.store.begin() as conn:
            rows = conn.execute(
                self._claim_query(_utcnow()).with_for_update(skip_locked=True)
            ).mappings().all()
            if not rows:
                return 0
            sent, failed = self._publish([dict(r) for r in rows])
            self._record(conn, sent, failed)
        return len(sent) + len(failed)

    def _run_leased(self) -> int:
        now = _utcnow()
        with self.store.begin() as conn:
            rows = conn.execute(self._claim_query(now)).mappings().all()
            if not rows:
                return 0
            conn.execute(
                update(outbox_t)
                .where(outbox_t.c.id.in_([r["id"] for r in rows]))
                .values(available_at=now + timedelta(seconds=self.lease))
            )
        claimed = [dict(r) for r in rows]
        sent, failed = self._publish(claimed)
        untried = [r["id"] for r in claimed if r["id"] not in sent and r["id"] not in failed]
        with self.store.begin() as conn:
            self._record(conn, sent, failed)
            if untried:
                conn.execute(update(outbox_t).where(outbox_t.c.id.in_(untried))
                             .values(available_at=_utcnow()))
        return len(sent) + len(failed)

    def _publish(
        self, rows: Sequence[dict[str, Any]]
    ) -> tuple[list[int], dict[int, tuple[int, str]]]:
        sent: list[int] = []
        failed: dict[int, tuple[int, str]] = {}
        for row in rows:
            try:
                self.publisher(row)
            except Exception as exc:
                failed[row["id"]] = (row["attempts"] + 1, f"{type(exc).__name__}: {exc}")
                log.warning("outbox event %s not published: %s", row["event_id"], exc)
                break  # the broker is likely down: the rest of the batch waits for next time
            sent.append(row["id"])
            if self.throttle:
                time.sleep(self.throttle)
        return sent, failed

    def _record(
        self, conn: Connection, sent: list[int], failed: dict[int, tuple[int, str]]
    ) -> None:
        now = _utcnow()
        if sent:
            conn.execute(update(outbox_t).where(outbox_t.c.id.in_(sent))
                         .values(status=SENT, sent_at=now, attempts=outbox_t.c.attempts + 1))
        for row_id, (attempts, error) in failed.items():
            dead = attempts >= self.max_attempts
            if dead:
                log.error("outbox row %s dead-lettered after %s attempts: %s",
                          row_id, attempts, error)
            conn.execute(
                update(outbox_t).where(outbox_t.c.id == row_id).values(
                    attempts=attempts, last_error=error, status=DEAD if dead else PENDING,
                    available_at=now + timedelta(seconds=self.delay(attempts)),
                )
            )

    def _cleanup(self) -> None:
        if self.retention <= 0 or time.monotonic() - self._last_cleanup < 60:
            return
        self._last_cleanup = time.monotonic()
        cutoff = _utcnow() - timedelta(seconds=self.retention)
        with self.store.begin() as conn:
            conn.execute(delete(outbox_t).where(outbox_t.c.status == SENT,
                                                outbox_t.c.sent_at < cutoff))

    def run(self, stop: threading.Event | None = None, interval: float | None = None) -> None:
        """Loop until ``stop`` is set: full batches back to back, idle polls ``interval`` apart."""
        stop = stop or threading.Event()
        interval = get_observability_settings().sagas_outbox_interval if interval is None \
            else interval
        log.info("outbox relay running (batch %s, every %ss when idle)", self.batch, interval)
        while not stop.is_set():
            try:
                done = self.run_once()
            except Exception as exc:
                log.warning("outbox relay pass failed: %s", exc)
                done = 0
            if done < self.batch:
                stop.wait(interval)


def requeue_dead(store: Any = None) -> int:
    """Give dead-lettered rows another round of attempts (after fixing the broker)."""
    if store is None:
        from sagas.runtime import get_store

        store = get_store()
    with store.begin() as conn:
        result = conn.execute(
            update(outbox_t).where(outbox_t.c.status == DEAD)
            .values(status=PENDING, attempts=0, available_at=_utcnow())
        )
    return int(result.rowcount or 0)


def stats(store: Any = None) -> dict[str, int]:
    if store is None:
        from sagas.runtime import get_store

        store = get_store()
    with store.read() as conn:
        rows = conn.execute(
            select(outbox_t.c.status, func.count()).group_by(outbox_t.c.status)
        ).all()
    return {r[0]: int(r[1]) for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sagas.outbox", description=__doc__.split(
        "\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("relay", help="publish pending events until stopped")
    relay.add_argument("--batch", type=int, default=None)
    relay.add_argument("--interval", type=float, default=None, help="idle poll interval (s)")
    relay.add_argument("--lease", type=float, default=30.0, help="SQLite claim lease (s)")
    relay.add_argument("--throttle", type=float, default=0.0,
                       help="pause after each publish (s): gentle backfills, tests")
    relay.add_argument("--once", action="store_true", help="one batch, then exit")
    sub.add_parser("requeue-dead", help="retry dead-lettered events")
    sub.add_parser("stats", help="rows per status")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "requeue-dead":
        print(requeue_dead())
        return 0
    if args.command == "stats":
        print(stats())
        return 0
    worker = Relay(batch=args.batch, lease=args.lease, throttle=args.throttle)
    if args.once:
        print(worker.run_once())
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.run(stop, args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

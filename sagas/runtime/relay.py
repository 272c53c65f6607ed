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

Run it: ``sagas -A yourapp relay`` (the Procfile's ``relay`` entry).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu import Connection as KombuConnection  # type: ignore[attr-defined]
from kombu import Exchange  # type: ignore[attr-defined]
from sqlalchemy import Connection, delete, func, inspect, select, update

from sagas.settings import SagaSettings
from sagas.store.outbox import DEAD, EXCHANGE, PENDING, SENT, outbox_t

__all__ = [
    "DEAD", "PENDING", "SENT", "KombuPublisher", "Relay", "outbox_t", "requeue_dead", "stats",
]
from sagas.store.sql import Store

log = logging.getLogger("sagas.relay")


def _utcnow() -> datetime:
    return datetime.now(UTC)

Publisher = Callable[[dict[str, Any]], None]


class KombuPublisher:
    """Publishes one outbox row to the topic exchange; reconnects after a broker error."""

    def __init__(self, url: str, exchange: str = EXCHANGE) -> None:
        self.url = url
        self.exchange = Exchange(exchange, type="topic", durable=True)  # type: ignore[no-untyped-call]
        self._conn: Any = None
        self._producer: Any = None

    def _ensure(self) -> Any:
        if self._producer is None:
            self._conn = KombuConnection(self.url, connect_timeout=5)  # type: ignore[no-untyped-call]
            self._conn.ensure_connection(max_retries=1)
            self._producer = self._conn.Producer(serializer="json")
            self.exchange(self._conn.default_channel).declare()  # type: ignore[no-untyped-call]
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
        store: Store,
        settings: SagaSettings,
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
        if publisher is None:
            publisher = KombuPublisher(settings.outbox_broker_url)
        self.store = store
        self.publisher = publisher
        self.batch = batch or settings.sagas_outbox_batch
        self.max_attempts = max_attempts or settings.sagas_outbox_max_attempts
        self.backoff, self.backoff_max = backoff, backoff_max
        self.lease = lease
        self.throttle = throttle
        self.retention = settings.sagas_outbox_retention if retention is None else retention
        self.interval = settings.sagas_outbox_interval
        self._last_cleanup = 0.0

    def _wait_for_schema(self, stop: threading.Event, interval: float) -> bool:
        """Before ``sagas db upgrade`` has run, wait for the outbox table, saying so once.

        Returns False when stopped first. An unreachable database is the pass's own business.
        """
        told = False
        while not stop.is_set():
            try:
                if inspect(self.store.engine).has_table(outbox_t.name):
                    if told:
                        log.info("the saga tables are there: relaying")
                    return True
            except Exception as exc:
                log.warning("outbox relay: database unavailable: %s",
                            str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            else:
                if not told:
                    log.info("waiting for the saga tables (run `sagas db upgrade`)")
                    told = True
            stop.wait(max(interval, 0.5))
        return False

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
        interval = self.interval if interval is None else interval
        if not self._wait_for_schema(stop, interval):
            return
        log.info("outbox relay running (batch %s, every %ss when idle)", self.batch, interval)
        while not stop.is_set():
            try:
                done = self.run_once()
            except Exception as exc:
                log.warning("outbox relay pass failed: %s", exc)
                done = 0
            if done < self.batch:
                stop.wait(interval)


def requeue_dead(store: Store) -> int:
    """Give dead-lettered rows another round of attempts (after fixing the broker)."""
    with store.begin() as conn:
        result = conn.execute(
            update(outbox_t).where(outbox_t.c.status == DEAD)
            .values(status=PENDING, attempts=0, available_at=_utcnow())
        )
    return int(result.rowcount or 0)


def stats(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute(
            select(outbox_t.c.status, func.count()).group_by(outbox_t.c.status)
        ).all()
    return {r[0]: int(r[1]) for r in rows}

"""The outbox relay: publishes the saga log's lifecycle events to a broker, in log order.

The log is the outbox (``sagas.store.outbox``): the relay keeps a cursor, the last log position
it published, in ``saga_relay_cursor``, reads the rows after it, publishes each row's events
and moves the cursor. At least once: a relay that dies before moving the cursor leaves those
rows to be sent again (consumers drop duplicates by event id).

Several relays may run (one per host for availability): the one holding the cursor's lease
publishes, the others wait for it to lapse. A relay renews its lease each pass and moves the
cursor only while it holds it, so two relays never publish the same rows, whatever the database.
On PostgreSQL sequence numbers are not handed out in commit order, so the log is read in order
of the writing transaction's id, and only rows of transactions older than every one still open
(``pg_snapshot_xmin``): a row that commits late is never skipped. On SQLite writers take turns,
so sequence order is commit order.

A failed publish is retried with exponential backoff; nothing is dropped. Run it:
``sagas -A yourapp relay`` (the Procfile's ``relay`` entry).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu import Connection as KombuConnection  # type: ignore[attr-defined]
from kombu import Exchange  # type: ignore[attr-defined]
from sqlalchemy import Connection, func, insert, inspect, literal_column, or_, select, update

from sagas.settings import SagaSettings
from sagas.store.log import entry_of
from sagas.store.outbox import EXCHANGE, cursor_t, events_of
from sagas.store.sql import Store, log_t, sagas_t

__all__ = ["KombuPublisher", "Relay", "RelayStats", "stats"]

log = logging.getLogger("sagas.relay")

DEFAULT_CURSOR = "default"


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


@dataclass(frozen=True)
class RelayStats:
    """Where the relay is: its cursor, what waits behind it, who holds the lease."""

    position: int
    pending: int  # log rows written after the cursor (their events are not yet published)
    newest: int
    owner: str | None
    lease_until: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.position, "pending": self.pending, "newest": self.newest,
            "owner": self.owner,
            "lease_until": None if self.lease_until is None else self.lease_until.isoformat(),
        }


class Relay:
    """Moves the log's lifecycle events to the broker; safe to run several at once."""

    def __init__(
        self,
        store: Store,
        settings: SagaSettings,
        publisher: Publisher | None = None,
        *,
        batch: int | None = None,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        lease: float = 30.0,
        throttle: float = 0.0,
        name: str = DEFAULT_CURSOR,
        owner: str | None = None,
    ) -> None:
        if publisher is None:
            publisher = KombuPublisher(settings.outbox_broker_url)
        self.store = store
        self.publisher = publisher
        self.batch = batch or settings.sagas_outbox_batch
        self.backoff, self.backoff_max = backoff, backoff_max
        self.lease = lease
        self.throttle = throttle
        self.interval = settings.sagas_outbox_interval
        self.name = name
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.failures = 0

    def _wait_for_schema(self, stop: threading.Event, interval: float) -> bool:
        """Before ``sagas db upgrade`` has run, wait for the cursor table, saying so once.

        Returns False when stopped first. An unreachable database is the pass's own business.
        """
        told = False
        while not stop.is_set():
            try:
                if inspect(self.store.engine).has_table(cursor_t.name):
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

    def delay(self, failures: int) -> float:
        """Backoff before the next try after ``failures`` failed passes (jittered)."""
        ceiling = min(self.backoff_max, self.backoff * 2 ** max(0, failures - 1))
        return random.uniform(ceiling / 2, ceiling)

    # --- the lease ----------------------------------------------------------------------------
    def _take_lease(self) -> tuple[int, int] | None:
        """Take or renew the cursor's lease; its (position, txid) while we hold it, else None."""
        now = _utcnow()
        with self.store.begin() as conn:
            taken = conn.execute(
                update(cursor_t)
                .where(
                    cursor_t.c.name == self.name,
                    or_(cursor_t.c.owner == self.owner, cursor_t.c.owner.is_(None),
                        cursor_t.c.lease_until < now),
                )
                .values(owner=self.owner, lease_until=now + timedelta(seconds=self.lease))
            ).rowcount
            if not taken:
                exists = conn.execute(
                    select(cursor_t.c.name).where(cursor_t.c.name == self.name)
                ).first()
                if exists is not None:
                    return None  # another relay holds it
                conn.execute(insert(cursor_t).values(
                    name=self.name, position=0, position_txid=0, owner=self.owner,
                    lease_until=now + timedelta(seconds=self.lease), updated_at=now,
                ))
            row = conn.execute(
                select(cursor_t.c.position, cursor_t.c.position_txid)
                .where(cursor_t.c.name == self.name)
            ).one()
        return int(row.position), int(row.position_txid or 0)

    def release(self) -> None:
        """Give the lease up (a relay stopping cleanly lets the next one start at once)."""
        with contextlib.suppress(Exception), self.store.begin() as conn:
            conn.execute(
                update(cursor_t)
                .where(cursor_t.c.name == self.name, cursor_t.c.owner == self.owner)
                .values(owner=None, lease_until=None)
            )

    # --- one pass -------------------------------------------------------------------------------
    def _read(self, conn: Connection, position: int, txid: int) -> list[Any]:
        columns = (log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step, log_t.c.saga_state,
                   log_t.c.transitions, log_t.c.result, log_t.c.txid, log_t.c.saga_id,
                   sagas_t.c.name, sagas_t.c.input)
        query = select(*columns).join_from(log_t, sagas_t, sagas_t.c.id == log_t.c.saga_id)
        if self.store.dialect == "postgresql":
            horizon: Any = literal_column("pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            query = query.where(
                or_(log_t.c.txid > txid, (log_t.c.txid == txid) & (log_t.c.seq > position)),
                log_t.c.txid < horizon,
            ).order_by(log_t.c.txid, log_t.c.seq)
        else:
            query = query.where(log_t.c.seq > position).order_by(log_t.c.seq)
        return list(conn.execute(query.limit(self.batch)).all())

    def run_once(self) -> int:
        """Publish one batch while holding the lease; returns how many log rows it passed."""
        lease = self._take_lease()
        if lease is None:
            return 0
        position, txid = lease
        with self.store.read() as conn:
            rows = self._read(conn, position, txid)
        if not rows:
            return 0
        done = 0
        last: tuple[int, int] | None = None
        error: Exception | None = None
        for row in rows:
            entry = entry_of(row[:7])
            try:
                for event in events_of(entry, str(row.saga_id), row.name, row.input):
                    self.publisher(event)
                    if self.throttle:
                        time.sleep(self.throttle)
            except Exception as exc:
                error = exc
                break
            done += 1
            last = (entry.seq, int(row.txid or 0))
        if last is not None:
            self._advance(*last)
        if error is not None:
            self.failures += 1
            log.warning("outbox relay: publishing failed after %d rows (%s); retrying in "
                        "about %.0fs", done, error, self.delay(self.failures))
            raise error
        self.failures = 0
        return done

    def _advance(self, position: int, txid: int) -> None:
        with self.store.begin() as conn:
            moved = conn.execute(
                update(cursor_t)
                .where(cursor_t.c.name == self.name, cursor_t.c.owner == self.owner)
                .values(position=position, position_txid=txid, updated_at=_utcnow())
            ).rowcount
        if not moved:
            log.warning("outbox relay %s lost its lease mid-batch; the next holder re-sends "
                        "what this one did not record", self.owner)

    def run(self, stop: threading.Event | None = None, interval: float | None = None) -> None:
        """Loop until ``stop`` is set: full batches back to back, idle polls ``interval`` apart."""
        stop = stop or threading.Event()
        interval = self.interval if interval is None else interval
        if not self._wait_for_schema(stop, interval):
            return
        log.info("outbox relay %s running (batch %s, every %ss when idle)", self.owner,
                 self.batch, interval)
        try:
            while not stop.is_set():
                try:
                    done = self.run_once()
                except Exception as exc:
                    if self.failures == 0:
                        log.warning("outbox relay pass failed: %s", exc)
                    stop.wait(self.delay(max(self.failures, 1)))
                    continue
                if done < self.batch:
                    stop.wait(interval)
        finally:
            self.release()


def stats(store: Store, name: str = DEFAULT_CURSOR) -> RelayStats:
    """The relay's cursor and how many log rows wait behind it (an indexed count)."""
    with store.read() as conn:
        cursor = conn.execute(
            select(cursor_t.c.position, cursor_t.c.position_txid, cursor_t.c.owner,
                   cursor_t.c.lease_until).where(cursor_t.c.name == name)
        ).first()
        position = int(cursor.position) if cursor is not None else 0
        txid = int(cursor.position_txid or 0) if cursor is not None else 0
        newest = int(conn.execute(select(func.coalesce(func.max(log_t.c.seq), 0))).scalar_one())
        pending_q = select(func.count()).select_from(log_t)
        if store.dialect == "postgresql":
            pending_q = pending_q.where(
                or_(log_t.c.txid > txid, (log_t.c.txid == txid) & (log_t.c.seq > position))
            )
        else:
            pending_q = pending_q.where(log_t.c.seq > position)
        pending = int(conn.execute(pending_q).scalar_one())
    lease = None
    if cursor is not None and cursor.lease_until is not None:
        lease = cursor.lease_until
        lease = lease if lease.tzinfo is not None else lease.replace(tzinfo=UTC)
    return RelayStats(position, pending, newest, None if cursor is None else cursor.owner, lease)

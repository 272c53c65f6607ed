"""The outbox table and the rows a transition adds to it, in the transition's own transaction.

An event exists if and only if its transition committed; ``sagas.runtime.relay`` publishes it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
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
    insert,
)

from sagas.coordinator import Decision, SagaSnapshot
from sagas.store.prepared import PreparedSet
from sagas.store.prepared import execute as run_prepared
from sagas.store.schema import Base, Id, db_now

EXCHANGE = "sagas.events"
PENDING, SENT, DEAD = "pending", "sent", "dead"


outbox_t = Table(
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


def outbox_rows(snap: SagaSnapshot, decision: Decision) -> list[dict[str, Any]]:
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
        elif name == "step.succeeded" and t.step is not None:
            payload["result"] = snap.steps[t.step].result
        rows.append({
            "event_id": event_id, "saga_id": snap.id, "saga": snap.name, "event": name,
            "routing_key": f"{snap.name}.{name}", "payload": payload,
            "status": PENDING, "attempts": 0,
        })
    return rows


def insert_outbox(conn: Connection, snap: SagaSnapshot, decision: Decision) -> None:
    """Called by the store inside the transition's transaction: one INSERT, or nothing."""
    rows = outbox_rows(snap, decision)
    if rows:
        run_prepared(conn, _HOT.get(conn, "insert"), rows)


# --- the relay -------------------------------------------------------------------------------

"""Dead letters: messages a worker refused as poison, kept where an operator can list them.

A refused message is acked (so it cannot block its queue or loop) and one row here says what it
was: why it was refused (a ``PoisonReason`` value), where it came from (queue, task, task id,
the saga and step when the message names them), how big it was, its headers and the start of
its body. ``sagas dead`` lists them, ``sagas dead show ID`` shows one, ``sagas dead purge``
deletes them. Rows are written in their own short transaction, never inside a transition's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
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
)

from sagas.store.schema import Base, Id, db_now
from sagas.store.sql import Store, _iso

BODY_KEPT = 8 * 1024
"""Bytes of a refused body kept in its row (a 10 MiB payload keeps its first 8 KiB)."""

dead_letters_t = Table(
    "saga_dead_letters", Base.metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), server_default=db_now(), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("queue", String(200)),
    Column("task", String(200)),
    Column("task_id", String(200)),
    Column("saga_id", String(64)),
    Column("step", String(100)),
    Column("size", Integer, nullable=False, default=0),
    Column("content_type", String(100)),
    Column("headers", JSON),
    Column("body", Text),
    Column("worker", String(200)),
    Index("ix_saga_dead_letters_reason_id", "reason", "id"),
)

_COLUMNS = ("id", "at", "reason", "detail", "queue", "task", "task_id", "saga_id", "step",
            "size", "content_type", "worker")


@dataclass(frozen=True)
class DeadLetter:
    """One refused message, as a worker saw it."""

    reason: str
    detail: str
    queue: str | None = None
    task: str | None = None
    task_id: str | None = None
    saga_id: str | None = None
    step: str | None = None
    size: int = 0
    content_type: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    body: bytes | str | None = None
    worker: str | None = None

    def row(self) -> dict[str, Any]:
        body = self.body
        if isinstance(body, bytes):
            body = body[:BODY_KEPT].decode("utf-8", errors="backslashreplace")
        elif body is not None:
            body = body[:BODY_KEPT]
        return {
            "reason": self.reason, "detail": _cut(self.detail, 4000),
            "queue": _cut(self.queue, 200), "task": _cut(self.task, 200),
            "task_id": _cut(self.task_id, 200), "saga_id": _cut(self.saga_id, 64),
            "step": _cut(self.step, 100), "size": self.size,
            "content_type": _cut(self.content_type, 100), "headers": self.headers or None,
            "body": body.replace("\x00", "\\x00") if body is not None else None,
            "worker": _cut(self.worker, 200),
        }


def _cut(value: str | None, size: int) -> str | None:
    """Fits a column, and PostgreSQL text never holds NUL (a hostile task name may)."""
    return None if value is None else value.replace("\x00", "\\x00")[:size]


def record(store: Store, letter: DeadLetter) -> int:
    """Store one dead letter; returns its id."""
    with store.begin() as conn:
        result = conn.execute(insert(dead_letters_t).returning(dead_letters_t.c.id),
                              letter.row())
        return int(result.scalar_one())


def _summary(row: Any) -> dict[str, Any]:
    out = {name: getattr(row, name) for name in _COLUMNS}
    out["at"] = _iso(row.at)
    return out


def list_dead(
    store: Store, *, reason: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[dict[str, Any]], int]:
    """Dead letters newest first (without headers and body), and how many there are."""
    query = select(*(dead_letters_t.c[name] for name in _COLUMNS))
    count = select(func.count()).select_from(dead_letters_t)
    if reason is not None:
        query = query.where(dead_letters_t.c.reason == reason)
        count = count.where(dead_letters_t.c.reason == reason)
    with store.read() as conn:
        rows = conn.execute(
            query.order_by(dead_letters_t.c.id.desc()).limit(limit).offset(offset)
        ).all()
        total = int(conn.execute(count).scalar_one())
    return [_summary(r) for r in rows], total


def get_dead(store: Store, letter_id: int) -> dict[str, Any] | None:
    """One dead letter with its headers and the start of its body, or None."""
    with store.read() as conn:
        row = conn.execute(
            select(dead_letters_t).where(dead_letters_t.c.id == letter_id)
        ).first()
    if row is None:
        return None
    out = _summary(row)
    out["headers"] = row.headers or {}
    out["body"] = row.body
    return out


def counts(store: Store) -> dict[str, int]:
    """Dead letters per reason."""
    with store.read() as conn:
        rows = conn.execute(
            select(dead_letters_t.c.reason, func.count()).group_by(dead_letters_t.c.reason)
        ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def purge(
    store: Store, *, ids: Sequence[int] = (), reason: str | None = None,
    before: datetime | None = None, everything: bool = False,
) -> int:
    """Delete the named dead letters (by id, reason or age, or all); returns how many went."""
    query = delete(dead_letters_t)
    if ids:
        query = query.where(dead_letters_t.c.id.in_(list(ids)))
    if reason is not None:
        query = query.where(dead_letters_t.c.reason == reason)
    if before is not None:
        query = query.where(dead_letters_t.c.at < before)
    if not (ids or reason is not None or before is not None or everything):
        return 0
    with store.begin() as conn:
        return int(conn.execute(query).rowcount or 0)

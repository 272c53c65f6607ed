"""Semantic locks in SQL: which saga holds a key, and who waits for it, in arrival order.

Every function runs inside the caller's write transaction: a saga's keys are taken in the
transaction that records its start and given up in the one that records its end, so a crash
never leaks or loses a lock. Keys are always taken in sorted order and a saga waits on one key
at a time (holding those before it), so waits follow key order and never form a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from sagas.store.schema import LockRow, LockWaitRow

locks_t: Table = LockRow.__table__  # type: ignore[assignment]
waits_t: Table = LockWaitRow.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class Blocked:
    """The first key a saga could not take, and the saga that holds it."""

    key: str
    holder: str


def take(conn: Connection, saga_id: str, keys: tuple[str, ...]) -> Blocked | None:
    """Take ``keys`` (sorted) for ``saga_id`` until one is held by another saga.

    Keys the saga holds already count as taken (a start sent twice, a waiter going on).
    """
    factory: Any = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    for key in keys:
        while True:
            taken = conn.execute(  # RETURNING: a driver's rowcount may say -1 here
                factory(locks_t).values(key=key, saga_id=saga_id)
                .on_conflict_do_nothing(index_elements=["key"]).returning(locks_t.c.key)
            ).first()
            if taken is not None:
                break
            holder = conn.execute(
                select(locks_t.c.saga_id).where(locks_t.c.key == key)
            ).scalar()
            if holder is None:
                continue  # given up between the two statements: take it now
            if holder != saga_id:
                return Blocked(key, str(holder))
            break
    return None


def wait_for(conn: Connection, key: str, saga_id: str) -> None:
    """Queue ``saga_id`` behind ``key``'s holder (and every earlier waiter)."""
    conn.execute(waits_t.insert().values(key=key, saga_id=saga_id))


def release(conn: Connection, saga_id: str) -> list[str]:
    """Give up every key ``saga_id`` holds and leave every queue; the keys it held, sorted."""
    held = sorted(str(k) for k in conn.execute(
        select(locks_t.c.key).where(locks_t.c.saga_id == saga_id)
    ).scalars())
    if held:
        conn.execute(delete(locks_t).where(locks_t.c.saga_id == saga_id))
    conn.execute(delete(waits_t).where(waits_t.c.saga_id == saga_id))
    return held


def first_waiter(conn: Connection, key: str) -> str | None:
    """The saga that has waited longest for ``key`` (removed from its queue), or None."""
    row = conn.execute(
        select(waits_t.c.seq, waits_t.c.saga_id).where(waits_t.c.key == key)
        .order_by(waits_t.c.seq).limit(1)
    ).first()
    if row is None:
        return None
    conn.execute(delete(waits_t).where(waits_t.c.seq == row.seq))
    return str(row.saga_id)


def holder_of(conn: Connection, key: str) -> str | None:
    return conn.execute(select(locks_t.c.saga_id).where(locks_t.c.key == key)).scalar()


def keys_of(conn: Connection, saga_ids: list[str]) -> dict[str, dict[str, list[str]]]:
    """Per saga: the keys it holds and the key it waits for (``{"holds": [...], "waits":
    [...]}``), for the views."""
    out: dict[str, dict[str, list[str]]] = {}
    for r in conn.execute(
        select(locks_t.c.saga_id, locks_t.c.key).where(locks_t.c.saga_id.in_(saga_ids))
        .order_by(locks_t.c.key)
    ):
        out.setdefault(str(r.saga_id), {"holds": [], "waits": []})["holds"].append(str(r.key))
    for r in conn.execute(
        select(waits_t.c.saga_id, waits_t.c.key).where(waits_t.c.saga_id.in_(saga_ids))
    ):
        out.setdefault(str(r.saga_id), {"holds": [], "waits": []})["waits"].append(str(r.key))
    return out


def listing(conn: Connection, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Held keys (newest first), each with its holder and the sagas queued behind it."""
    query = select(locks_t).order_by(locks_t.c.taken_at.desc(), locks_t.c.key).limit(limit)
    if key is not None:
        query = select(locks_t).where(locks_t.c.key == key)
    rows = conn.execute(query).all()
    keys = [str(r.key) for r in rows]
    waiting: dict[str, list[str]] = {}
    if keys:
        for w in conn.execute(
            select(waits_t.c.key, waits_t.c.saga_id).where(waits_t.c.key.in_(keys))
            .order_by(waits_t.c.seq)
        ):
            waiting.setdefault(str(w.key), []).append(str(w.saga_id))
    return [
        {"key": str(r.key), "holder": str(r.saga_id), "taken_at": r.taken_at,
         "waiting": waiting.get(str(r.key), [])}
        for r in rows
    ]

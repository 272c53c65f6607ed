"""Durable saga state in SQL: the source of truth every decision is read from and written to.

Per transition the store spends one locked read (saga row joined to its steps; on PostgreSQL
the row lock is its own statement first), one batched
UPDATE of the changed steps, one batched INSERT of the events, one UPDATE of the saga row, and
the commit. On SQLite every write transaction is ``BEGIN IMMEDIATE`` (writers serialise, so a
read-then-write never races); on PostgreSQL the saga row is locked ``FOR UPDATE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Engine,
    Table,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.pool import NullPool

from sagas.coordinator import Decision, SagaSnapshot, StepSnapshot
from sagas.errors import IdempotencyConflictError, SagaNotFoundError, StoreUnavailableError
from sagas.states import SAGA_SETTLED, SagaState, StepState
from sagas.store.outbox import insert_outbox
from sagas.store.prepared import PreparedSet
from sagas.store.prepared import execute as run
from sagas.store.schema import EventRow, SagaRow, StepRow, db_now

sagas_t: Table = SagaRow.__table__  # type: ignore[assignment]
steps_t: Table = StepRow.__table__  # type: ignore[assignment]
events_t: Table = EventRow.__table__  # type: ignore[assignment]

READ_ONLY = "sagas_read_only"
"""Execution option of a read transaction: on SQLite it begins without the write lock."""

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(UTC)


def input_digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def get_engine(url: str, echo: bool = False) -> Engine:
    """One engine per process and URL: pools must never cross a fork."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        with _engines_lock:
            engine = _engines.get(key)
            if engine is None:
                engine = _make_engine(url, echo)
                _engines[key] = engine
    return engine


def _make_engine(url: str, echo: bool) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine = create_engine(url, echo=echo, pool_size=5, max_overflow=5)
        _ping_when_idle(engine)
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, echo=echo, poolclass=NullPool if parsed.database == ":memory:" else None,
        connect_args={"timeout": 60, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE), so two transitions never
        # deadlock upgrading a read lock; readers (Store.read) begin deferred and never wait
        # on, nor block, a writer in WAL mode. On the driver directly: exec_driver_sql cost
        # ~30 us of bookkeeping per transaction. A timeout still surfaces as OperationalError.
        statement = "BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE"
        dbapi_conn = conn.connection.dbapi_connection
        try:
            dbapi_conn.execute(statement)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise DBAPIError.instance(
                statement, (), exc, sqlite3.Error, dialect=conn.dialect
            ) from exc

    return engine


PING_AFTER_IDLE = 1.0
"""Seconds a pooled connection may sit unused before its next checkout pings the server."""


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping`` costs a round trip per transaction; ping only connections left idle.

    A connection back in use within a second was alive a second ago; an older one is pinged and,
    if dead, replaced (raising DisconnectionError makes the pool retry with a fresh one). Any
    disconnect SQLAlchemy detects still invalidates the whole pool.
    """

    @event.listens_for(engine, "checkin")
    def _mark_idle(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["sagas_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("sagas_idle_since")
        if since is not None and time.monotonic() - since < PING_AFTER_IDLE:
            return
        try:
            cursor = dbapi_conn.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
        except Exception as exc:
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc


_UPDATE_STEP = (
    update(steps_t)
    .where(steps_t.c.saga_id == bindparam("b_saga_id"), steps_t.c.name == bindparam("b_name"))
    .values(
        state=bindparam("b_state"),
        attempts=bindparam("b_attempts"),
        compensation_attempts=bindparam("b_comp_attempts"),
        result=bindparam("b_result", type_=JSON),
        error=bindparam("b_error"),
        started_at=func.coalesce(bindparam("b_started_at", type_=steps_t.c.started_at.type),
                                 steps_t.c.started_at),
        finished_at=bindparam("b_finished_at", type_=steps_t.c.finished_at.type),
    )
)

# Hot-path statements are built once: building a Core construct and its cache key per call
# cost more CPU than SQLite spends executing it (py-spy / cProfile, see docs/performance.md).
_LOAD = (
    select(
        sagas_t.c.name, sagas_t.c.state, sagas_t.c.input, sagas_t.c.error,
        sagas_t.c.definition_version, sagas_t.c.definition_fingerprint,
        steps_t.c.name.label("step"), steps_t.c.state.label("step_state"),
        steps_t.c.attempts, steps_t.c.compensation_attempts, steps_t.c.result,
        steps_t.c.error.label("step_error"),
    )
    .join_from(sagas_t, steps_t, steps_t.c.saga_id == sagas_t.c.id)
    .where(sagas_t.c.id == bindparam("b_saga_id"))
)
_LOCK = select(sagas_t.c.id).where(sagas_t.c.id == bindparam("b_saga_id")).with_for_update()
_FIND_BY_ID = select(sagas_t.c.id, sagas_t.c.input_digest).where(
    sagas_t.c.id == bindparam("b_saga_id")
)
_FIND_BY_KEY = select(sagas_t.c.id, sagas_t.c.input_digest).where(
    sagas_t.c.idempotency_key == bindparam("b_key")
)
_INSERT_SAGA = insert(sagas_t)
_INSERT_STEPS = insert(steps_t)
_INSERT_EVENTS = insert(events_t)
_SAGA_TOUCH = {"updated_at": db_now(), "version": sagas_t.c.version + 1,
               "stall_deadline": bindparam("b_stall", type_=sagas_t.c.stall_deadline.type)}
_UPDATE_SAGA = (
    update(sagas_t).where(sagas_t.c.id == bindparam("b_saga_id")).values(**_SAGA_TOUCH)
)
_UPDATE_SAGA_STATE = (
    update(sagas_t)
    .where(sagas_t.c.id == bindparam("b_saga_id"))
    .values(**_SAGA_TOUCH, state=bindparam("b_state"), error=bindparam("b_error"))
)

# Settling a saga hands back its start time (no extra round trip) for duration metrics.
_UPDATE_SAGA_SETTLE = _UPDATE_SAGA_STATE.returning(sagas_t.c.created_at)

_SAGA_COLUMNS = ("id", "name", "state", "input", "idempotency_key", "input_digest", "error",
                 "stall_deadline", "deadline_at", "version", "definition_version",
                 "definition_fingerprint")
_STEP_COLUMNS = ("saga_id", "name", "state", "attempts", "compensation_attempts", "result",
                 "error", "started_at", "finished_at")
_EVENT_COLUMNS = ("saga_id", "step", "from_state", "to_state", "attempt", "error")
HOT = PreparedSet({
    "load": (_LOAD, None),
    "lock": (_LOCK, None),
    "insert_saga": (_INSERT_SAGA, _SAGA_COLUMNS),
    "insert_steps": (_INSERT_STEPS, _STEP_COLUMNS),
    "insert_events": (_INSERT_EVENTS, _EVENT_COLUMNS),
    "update_step": (_UPDATE_STEP, None),
    "update_saga": (_UPDATE_SAGA, None),
    "update_saga_state": (_UPDATE_SAGA_STATE, None),
    "settle_saga": (_UPDATE_SAGA_SETTLE, None),
})
"""The statements every transition runs, on the DBAPI cursor (see ``sagas.store.prepared``)."""

_STARTING = {StepState.RUNNING, StepState.COMPENSATING}
_FINISHED = {
    StepState.SUCCEEDED, StepState.FAILED, StepState.COMPENSATED,
    StepState.COMPENSATION_FAILED, StepState.SKIPPED,
}


StepOrder = Callable[[str, int], Sequence[str] | None]
"""A saga version's step order (its definition's topological order), or None when unknown."""


class Store:
    """The saga tables of one database: the engine's only way to read and write them."""

    def __init__(
        self, url: str, *, echo: bool = False, outbox: bool = True,
        step_order: StepOrder | None = None,
    ) -> None:
        self.url = url
        self.echo = echo
        self.outbox = outbox
        self.step_order = step_order
        self.dialect = make_url(url).get_backend_name()

    @property
    def engine(self) -> Engine:
        return get_engine(self.url, self.echo)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        try:
            with self.engine.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailableError(f"saga store unavailable: {exc.orig}") from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailableError(f"saga store unavailable: {exc.orig}") from exc

    # --- write side ------------------------------------------------------------
    def find_existing(
        self, conn: Connection, saga_id: str, idempotency_key: str | None, digest: str | None
    ) -> str | None:
        """The id of a saga this start duplicates; refuses a reused key with another payload."""
        row = conn.execute(_FIND_BY_ID, {"b_saga_id": saga_id}).first()
        if row is None and idempotency_key is not None:
            row = conn.execute(_FIND_BY_KEY, {"b_key": idempotency_key}).first()
            if row is not None and row.input_digest != digest:
                raise IdempotencyConflictError(
                    f"idempotency key {idempotency_key!r} was already used by saga {row.id} "
                    "with a different payload"
                )
        return None if row is None else str(row.id)

    def insert_new(
        self,
        conn: Connection,
        snap: SagaSnapshot,
        decision: Decision,
        *,
        idempotency_key: str | None,
        digest: str | None,
        stall_deadline: datetime | None,
        deadline_at: datetime | None,
    ) -> None:
        now = utcnow()
        run(
            conn, HOT.get(conn, "insert_saga"),
            {
                "id": snap.id, "name": snap.name, "state": str(snap.state), "input": snap.input,
                "idempotency_key": idempotency_key, "input_digest": digest, "error": snap.error,
                "stall_deadline": stall_deadline, "deadline_at": deadline_at, "version": 1,
                "definition_version": snap.version, "definition_fingerprint": snap.fingerprint,
            },
        )
        run(
            conn, HOT.get(conn, "insert_steps"),
            [
                {
                    "saga_id": snap.id, "name": s.name, "state": str(s.state),
                    "attempts": s.attempts,
                    "compensation_attempts": s.compensation_attempts,
                    "result": s.result, "error": s.error,
                    "started_at": now if s.state in _STARTING else None, "finished_at": None,
                }
                for s in snap.steps.values()
            ],
        )
        self._insert_events(conn, snap.id, decision)
        if self.outbox:
            insert_outbox(conn, snap, decision)

    def load(self, conn: Connection, saga_id: str, lock: bool = True) -> SagaSnapshot | None:
        params = {"b_saga_id": saga_id}
        # Lock first, read after (PostgreSQL): in READ COMMITTED a joined FOR UPDATE re-checks
        # only the locked row after waiting, and would hand back step rows from before the wait.
        if lock and self.dialect == "postgresql" and not run(conn, HOT.get(conn, "lock"), params):
            return None
        rows = run(conn, HOT.get(conn, "load"), params)
        if not rows:
            return None
        # Columns in _LOAD's order: saga name, state, input, error, definition version and
        # fingerprint, then the step's name, state, attempts, compensation attempts, result, error.
        name, state, saga_input, error, version, fingerprint = rows[0][:6]
        return SagaSnapshot(
            id=saga_id, name=name, state=SagaState(state), input=saga_input, error=error,
            steps={
                r[6]: StepSnapshot(r[6], StepState(r[7]), r[8], r[10], r[11], r[9])
                for r in rows
            },
            version=int(version or 1), fingerprint=fingerprint,
        )

    def save(
        self,
        conn: Connection,
        snap: SagaSnapshot,
        decision: Decision,
        stall_deadline: datetime | None,
    ) -> datetime | None:
        """Write the decision; returns the saga's start time when this decision settled it."""
        now = utcnow()
        if decision.changed_steps:
            run(
                conn, HOT.get(conn, "update_step"),
                [
                    {
                        "b_saga_id": snap.id, "b_name": name,
                        "b_state": str(snap.steps[name].state),
                        "b_attempts": snap.steps[name].attempts,
                        "b_comp_attempts": snap.steps[name].compensation_attempts,
                        "b_result": snap.steps[name].result,
                        "b_error": snap.steps[name].error,
                        "b_started_at": now if snap.steps[name].state in _STARTING else None,
                        "b_finished_at": now if snap.steps[name].state in _FINISHED else None,
                    }
                    for name in decision.changed_steps
                ],
            )
        self._insert_events(conn, snap.id, decision)
        if self.outbox:
            insert_outbox(conn, snap, decision)
        params: dict[str, Any] = {
            "b_saga_id": snap.id,
            "b_stall": None if snap.state in SAGA_SETTLED else stall_deadline,
        }
        if decision.saga_changed:
            params.update(b_state=str(snap.state), b_error=snap.error)
            if snap.state in SAGA_SETTLED:
                returned = run(conn, HOT.get(conn, "settle_saga"), params)
                return returned[0][0] if returned else None
            run(conn, HOT.get(conn, "update_saga_state"), params)
        else:
            run(conn, HOT.get(conn, "update_saga"), params)
        return None

    def _insert_events(self, conn: Connection, saga_id: str, decision: Decision) -> None:
        if decision.transitions:
            run(
                conn, HOT.get(conn, "insert_events"),
                [
                    {
                        "saga_id": saga_id, "step": t.step, "from_state": t.from_state,
                        "to_state": t.to_state, "attempt": t.attempt, "error": t.error,
                    }
                    for t in decision.transitions
                ],
            )

    # --- read side -------------------------------------------------------------
    def get_view(self, saga_id: str) -> dict[str, Any]:
        """The saga as scripts and the API see it (the same JSON everywhere)."""
        with self.read() as conn:
            saga = conn.execute(select(sagas_t).where(sagas_t.c.id == saga_id)).first()
            if saga is None:
                raise SagaNotFoundError(f"no saga with id {saga_id!r}")
            steps = conn.execute(select(steps_t).where(steps_t.c.saga_id == saga_id)).all()
            events = conn.execute(
                select(events_t).where(events_t.c.saga_id == saga_id).order_by(events_t.c.id)
            ).all()
        order = self._step_order(saga.name, saga.definition_version, [s.name for s in steps])
        by_name = {s.name: s for s in steps}
        return {
            "id": saga.id,
            "name": saga.name,
            "version": saga.definition_version,
            "fingerprint": saga.definition_fingerprint,
            "state": saga.state,
            "error": saga.error,
            "created_at": _iso(saga.created_at),
            "updated_at": _iso(saga.updated_at),
            "context": {
                "input": saga.input,
                "results": {s.name: s.result for s in steps if s.result is not None},
            },
            "steps": [
                {
                    "name": n, "state": by_name[n].state, "attempts": by_name[n].attempts,
                    "compensation_attempts": by_name[n].compensation_attempts,
                    "error": by_name[n].error, "result": by_name[n].result,
                    "started_at": _iso(by_name[n].started_at),
                    "finished_at": _iso(by_name[n].finished_at),
                }
                for n in order
            ],
            "events": [
                {
                    "id": e.id, "step": e.step, "from_state": e.from_state,
                    "to_state": e.to_state, "attempt": e.attempt, "error": e.error,
                    "at": _iso(e.at),
                }
                for e in events
            ],
        }

    def list_sagas(
        self, *, state: str | None = None, name: str | None = None,
        version: int | None = None, limit: int = 50, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        query = select(
            sagas_t.c.id, sagas_t.c.name, sagas_t.c.definition_version, sagas_t.c.state,
            sagas_t.c.error, sagas_t.c.created_at, sagas_t.c.updated_at,
        )
        count = select(func.count()).select_from(sagas_t)
        if version is not None:
            query = query.where(sagas_t.c.definition_version == version)
            count = count.where(sagas_t.c.definition_version == version)
        if state:
            query = query.where(sagas_t.c.state == state)
            count = count.where(sagas_t.c.state == state)
        if name:
            query = query.where(sagas_t.c.name == name)
            count = count.where(sagas_t.c.name == name)
        query = query.order_by(sagas_t.c.created_at.desc(), sagas_t.c.id)
        query = query.limit(limit).offset(offset)
        with self.read() as conn:
            rows = conn.execute(query).all()
            total = int(conn.execute(count).scalar_one())
        return [
            {
                "id": r.id, "name": r.name, "version": r.definition_version, "state": r.state,
                "error": r.error,
                "created_at": _iso(r.created_at), "updated_at": _iso(r.updated_at),
            }
            for r in rows
        ], total

    def resolve_id(self, id_or_prefix: str) -> str:
        """The saga id itself, or the one id that begins with it (as printed, or shortened).

        Raises ``SagaNotFoundError`` when no id, or more than one, begins with it.
        """
        pattern = id_or_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        with self.read() as conn:
            if conn.execute(select(sagas_t.c.id).where(sagas_t.c.id == id_or_prefix)).first():
                return id_or_prefix
            found = [str(r.id) for r in conn.execute(
                select(sagas_t.c.id).where(sagas_t.c.id.like(pattern + "%", escape="\\"))
                .limit(3)
            )]
        if len(found) == 1:
            return found[0]
        if not found:
            raise SagaNotFoundError(f"no saga with id {id_or_prefix!r}")
        raise SagaNotFoundError(
            f"{id_or_prefix!r} is the beginning of several saga ids ({', '.join(found[:2])}, "
            "...): give more of it"
        )

    def saga_states(self, saga_ids: Sequence[str]) -> dict[str, str]:
        """The state of each known id, in one query per 500 ids; unknown ids are absent."""
        ids = list(dict.fromkeys(saga_ids))
        out: dict[str, str] = {}
        with self.read() as conn:
            for i in range(0, len(ids), 500):
                rows = conn.execute(
                    select(sagas_t.c.id, sagas_t.c.state).where(sagas_t.c.id.in_(ids[i:i + 500]))
                ).all()
                out.update({str(r.id): str(r.state) for r in rows})
        return out

    def read_outcomes(
        self, saga_ids: Sequence[str]
    ) -> tuple[list[Any], dict[str, list[Any]]]:
        """Saga rows (id, name, state, error) and their step rows, in two queries per 500 ids."""
        ids = list(dict.fromkeys(saga_ids))
        sagas: list[Any] = []
        steps: dict[str, list[Any]] = {}
        with self.read() as conn:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                sagas += conn.execute(
                    select(sagas_t.c.id, sagas_t.c.name, sagas_t.c.definition_version,
                           sagas_t.c.state, sagas_t.c.error)
                    .where(sagas_t.c.id.in_(chunk))
                ).all()
                for row in conn.execute(
                    select(steps_t.c.saga_id, steps_t.c.name, steps_t.c.state, steps_t.c.result,
                           steps_t.c.error, steps_t.c.attempts, steps_t.c.compensation_attempts)
                    .where(steps_t.c.saga_id.in_(chunk))
                ):
                    steps.setdefault(str(row.saga_id), []).append(row)
        return sagas, steps

    def ordered_steps(self, saga_name: str, version: int, names: list[str]) -> list[str]:
        """Step names in the definition's order (unknown ones last, by name)."""
        return self._step_order(saga_name, version, names)

    def step_states(self, saga_ids: list[str]) -> dict[str, dict[str, str]]:
        with self.read() as conn:
            rows = conn.execute(
                select(steps_t.c.saga_id, steps_t.c.name, steps_t.c.state).where(
                    steps_t.c.saga_id.in_(saga_ids)
                )
            ).all()
        out: dict[str, dict[str, str]] = {}
        for r in rows:
            out.setdefault(r.saga_id, {})[r.name] = r.state
        return out

    def _step_order(self, saga_name: str, version: int, names: list[str]) -> list[str]:
        known_order = (
            self.step_order(saga_name, version) if self.step_order is not None else None
        )
        known = [n for n in known_order or () if n in names]
        return known + sorted(n for n in names if n not in known)

    def versions_in_use(self) -> list[dict[str, Any]]:
        """Per saga name, version and fingerprint: instances in flight (live or parked) and all."""
        live = sagas_t.c.state.in_(
            [str(SagaState.PENDING), str(SagaState.RUNNING), str(SagaState.COMPENSATING),
             str(SagaState.COMPENSATION_FAILED)]
        )
        query = (
            select(sagas_t.c.name, sagas_t.c.definition_version, sagas_t.c.definition_fingerprint,
                   func.count().label("total"),
                   func.sum(case((live, 1), else_=0)).label("in_flight"))
            .group_by(sagas_t.c.name, sagas_t.c.definition_version,
                      sagas_t.c.definition_fingerprint)
            .order_by(sagas_t.c.name, sagas_t.c.definition_version)
        )
        with self.read() as conn:
            rows = conn.execute(query).all()
        return [
            {"name": r.name, "version": int(r.definition_version),
             "fingerprint": r.definition_fingerprint, "in_flight": int(r.in_flight or 0),
             "total": int(r.total)}
            for r in rows
        ]

    def counts_by_state(self) -> dict[str, int]:
        with self.read() as conn:
            rows = conn.execute(
                select(sagas_t.c.state, func.count()).group_by(sagas_t.c.state)
            ).all()
        return {r[0]: int(r[1]) for r in rows}


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def deadline_after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


"""Durable saga state in SQL: the source of truth every decision is read from and written to.

Two tables hold a saga: its row in ``saga_instances`` (input, state, deadlines), written when
the saga starts and again only when the saga's own state changes, and its decisions in
``saga_log`` (``sagas.store.log``), one row per committed decision. A step's state is the
replay of the log. What a transition costs, by kind:

- a start: the saga row and its first log row, in one transaction (2 statements);
- a step's success whose consequence the graph alone decides (``Saga.success_shape``): one
  ``INSERT ... SELECT`` of its log row that the database itself refuses when the saga is no
  longer RUNNING (the saga row is read, and on PostgreSQL share-locked, in the same statement)
  or when the success was recorded before (the unique ``(saga_id, dedupe)`` index): no
  read-before-write, no saga row write. The saga's last step instead completes it with one
  conditional ``UPDATE`` of the saga row and its log row;
- anything else (a join, a failure, a compensation, cancel, retry, recovery): the saga row
  locked (``BEGIN IMMEDIATE`` on SQLite, ``FOR UPDATE`` on PostgreSQL), its log read and
  replayed, the decision's log row appended, and the saga row updated when its state changed.

Every decision and its log row commit before anything is published.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Connection,
    Engine,
    String,
    Table,
    bindparam,
    case,
    func,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql import ClauseElement

from sagas.coordinator import Decision, SagaSnapshot
from sagas.errors import IdempotencyConflictError, SagaNotFoundError, StoreUnavailableError
from sagas.states import SAGA_SETTLED, SagaState, StepState
from sagas.store import locks, outages
from sagas.store import log as saga_log
from sagas.store.connect import READ_ONLY, get_engine, input_digest, utcnow, writer_lock
from sagas.store.log import LogEntry, dedupe_key, encode_decision, entry_of
from sagas.store.prepared import PreparedSet, count
from sagas.store.prepared import execute as run
from sagas.store.schema import LogRow, SagaRow, db_now

__all__ = [
    "READ_ONLY", "Store", "deadline_after", "get_engine", "input_digest", "log_t", "sagas_t",
    "utcnow",
]

sagas_t: Table = SagaRow.__table__  # type: ignore[assignment]
log_t: Table = LogRow.__table__  # type: ignore[assignment]

_LOG_COLUMNS = ("saga_id", "at", "cause", "step", "saga_state", "transitions", "result", "dedupe")
_ENTRY_COLUMNS = (log_t.c.seq, log_t.c.at, log_t.c.cause, log_t.c.step, log_t.c.saga_state,
                  log_t.c.transitions, log_t.c.result)


def _txid(dialect: str) -> Any:
    """The writing transaction's id on PostgreSQL (the relay's commit-safe order), else NULL."""
    if dialect == "postgresql":
        return literal_column("pg_current_xact_id()::text::bigint", BigInteger)
    return None


def _insert_log(dialect: str) -> ClauseElement:
    if dialect == "postgresql":
        return insert(log_t).values(txid=_txid(dialect))
    return insert(log_t)


def _log_select(dialect: str) -> Any:
    """The log row's values as a SELECT list (for INSERT ... SELECT guarded by a source)."""
    return select(
        bindparam("saga_id", type_=String), bindparam("at", type_=log_t.c.at.type),
        bindparam("cause", type_=String), bindparam("step", type_=String),
        bindparam("saga_state", type_=String),
        bindparam("transitions", type_=JSON), bindparam("result", type_=JSON),
        bindparam("dedupe", type_=String),
        *([_txid(dialect)] if dialect == "postgresql" else []),
    )


def _log_columns(dialect: str) -> list[str]:
    return [*_LOG_COLUMNS, *(["txid"] if dialect == "postgresql" else [])]


def _start_pg(dialect: str) -> ClauseElement:
    """PostgreSQL: the saga row and its start row in one statement (one round trip, one commit).

    A duplicate id or idempotency key inserts neither (the log row selects from the saga
    insert's RETURNING, which is empty on conflict).
    """
    saga = (
        postgresql.insert(sagas_t)
        .values({c: bindparam(f"s_{c}", type_=sagas_t.c[c].type) for c in _SAGA_COLUMNS})
        .on_conflict_do_nothing()
        .returning(sagas_t.c.id)
        .cte("new_saga")
    )
    built: ClauseElement = insert(log_t).from_select(
        _log_columns(dialect), _log_select(dialect).select_from(saga)
    )
    return built


def _complete_pg(dialect: str) -> ClauseElement:
    """PostgreSQL: the saga's last step completes it in one statement, only while it runs on
    this graph; returns the saga's start time (no row when refused)."""
    done = _COMPLETE_IF_RUNNING.cte("done")
    entry = (
        insert(log_t).from_select(_log_columns(dialect), _log_select(dialect).select_from(done))
        .returning(log_t.c.seq).cte("entry")
    )
    built: ClauseElement = select(done.c.created_at).add_cte(entry)
    return built


def _insert_log_if_running(dialect: str) -> ClauseElement:
    """The log row of a success the graph decides, only while the saga runs on this graph.

    Refused (no row) when the saga is not RUNNING, runs another graph, or the same success is
    recorded already. On PostgreSQL the saga row is share-locked by the same statement, so a
    concurrent decision that holds it (cancel, a failure) is either seen whole or waits for us.
    """
    guard = (
        _log_select(dialect)
        .select_from(sagas_t)
        .where(
            sagas_t.c.id == bindparam("b_saga_id"),
            sagas_t.c.state == str(SagaState.RUNNING),
            func.coalesce(sagas_t.c.definition_fingerprint, bindparam("b_fingerprint"))
            == bindparam("b_fingerprint"),
        )
    )
    columns = _log_columns(dialect)
    if dialect == "postgresql":
        guard = guard.with_for_update(read=True, key_share=True)
        stmt: Any = postgresql.insert(log_t).from_select(columns, guard)
    else:
        stmt = sqlite.insert(log_t).from_select(columns, guard)
    built: ClauseElement = stmt.on_conflict_do_nothing(index_elements=["saga_id", "dedupe"])
    return built


def _insert_saga(dialect: str) -> ClauseElement:
    """A new saga row; a duplicate id or idempotency key inserts nothing (no error)."""
    factory: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    built: ClauseElement = factory(sagas_t).on_conflict_do_nothing()
    return built


_SAGA_STATE = (
    update(sagas_t)
    .where(sagas_t.c.id == bindparam("b_saga_id"))
    .values(
        state=bindparam("b_state"), error=bindparam("b_error"), updated_at=db_now(),
        stall_deadline=bindparam("b_stall", type_=sagas_t.c.stall_deadline.type),
    )
    .returning(sagas_t.c.created_at)
)
_COMPLETE_IF_RUNNING = (
    update(sagas_t)
    .where(
        sagas_t.c.id == bindparam("b_saga_id"), sagas_t.c.state == str(SagaState.RUNNING),
        func.coalesce(sagas_t.c.definition_fingerprint, bindparam("b_fingerprint"))
        == bindparam("b_fingerprint"),
    )
    .values(state=str(SagaState.COMPLETED), updated_at=db_now(), stall_deadline=None)
    .returning(sagas_t.c.created_at)
)
_LOAD_SAGA = select(
    sagas_t.c.name, sagas_t.c.state, sagas_t.c.input, sagas_t.c.error,
    sagas_t.c.definition_version, sagas_t.c.definition_fingerprint,
).where(sagas_t.c.id == bindparam("b_saga_id"))
# PostgreSQL: the saga row locked and read in one statement (a locked row is read in its
# latest version, even after waiting for another transaction's lock).
_LOCK = _LOAD_SAGA.with_for_update()
_LOAD_LOG = (
    select(*_ENTRY_COLUMNS).where(log_t.c.saga_id == bindparam("b_saga_id"))
    .order_by(log_t.c.seq)
)
_FIND_BY_ID = select(sagas_t.c.id, sagas_t.c.input_digest).where(
    sagas_t.c.id == bindparam("b_saga_id")
)
_FIND_BY_KEY = select(sagas_t.c.id, sagas_t.c.input_digest).where(
    sagas_t.c.idempotency_key == bindparam("b_key")
)
_SAGA_COLUMNS = ("id", "name", "state", "input", "idempotency_key", "input_digest", "error",
                 "stall_deadline", "deadline_at", "version", "definition_version",
                 "definition_fingerprint")

HOT = PreparedSet({
    "start_pg": (_start_pg, None),
    "complete_pg": (_complete_pg, None),
    "insert_saga": (_insert_saga, _SAGA_COLUMNS),
    "insert_log": (_insert_log, _LOG_COLUMNS),
    "insert_log_if_running": (_insert_log_if_running, None),
    "complete_if_running": (_COMPLETE_IF_RUNNING, None),
    "saga_state": (_SAGA_STATE, None),
    "lock": (_LOCK, None),
    "load_saga": (_LOAD_SAGA, None),
    "load_log": (_LOAD_LOG, None),
})
"""The statements every transition runs, on the DBAPI cursor (see ``sagas.store.prepared``)."""

_NO_LOCK = contextlib.nullcontext()
_INHERITED: list[Any] = []
"""Connections a forked child inherited from its parent's main thread: kept, never used."""

StepOrder = Callable[[str, int], Sequence[str] | None]
"""A saga version's step order (its definition's topological order), or None when unknown."""

_FINISHED = frozenset({
    StepState.SUCCEEDED, StepState.FAILED, StepState.COMPENSATED,
    StepState.COMPENSATION_FAILED, StepState.SKIPPED,
})


class Store:
    """The saga tables of one database: the engine's only way to read and write them."""

    def __init__(
        self, url: str, *, echo: bool = False, step_order: StepOrder | None = None,
    ) -> None:
        self.url = url
        self.echo = echo
        self.step_order = step_order
        self.dialect = make_url(url).get_backend_name()
        self._local = threading.local()
        self._writer_lock = writer_lock(url)

    @property
    def engine(self) -> Engine:
        return get_engine(self.url, self.echo)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One write transaction; ``StoreUnavailableError`` when the database cannot be reached.

        A process's main thread (a prefork pool process, a script) keeps its connection open
        between transactions instead of checking one out of the pool for each transition; any
        other thread (a web app's) checks one out per transaction. A connection the database
        dropped is replaced by the next transaction. One WARNING line per outage, and one INFO
        line when the database answers again (``outages``).
        """
        try:
            held = self._held() if self.dialect != "postgresql" else None
            if held is None:
                with self._writing(), self.engine.begin() as conn:
                    yield conn
            else:
                try:
                    with self._writing(), held.begin():
                        yield held
                except DBAPIError as exc:
                    if exc.connection_invalidated or held.invalidated:
                        self._drop_held()
                    raise
        except (OperationalError, InterfaceError) as exc:
            outages.down(self, exc)
            raise StoreUnavailableError(f"saga store unavailable: {exc.orig}") from exc
        outages.up(self)

    def _writing(self) -> contextlib.AbstractContextManager[None]:
        return self._writer_lock.held() if self._writer_lock is not None else _NO_LOCK

    def _held(self, autocommit: bool = False) -> Connection | None:
        """The main thread's own connection, opened on first use and kept; None elsewhere.

        On PostgreSQL it runs in autocommit, for single statements only (``single``); the
        multi-statement transactions of the lock path check a pooled connection out. On SQLite
        it serves both (its transactions begin explicitly).
        """
        if threading.current_thread() is not threading.main_thread():
            return None
        held: tuple[int, Connection] | None = getattr(self._local, "held", None)
        pid = os.getpid()
        if held is not None:
            if held[0] == pid and not held[1].closed and not held[1].invalidated:
                return held[1]
            if held[0] != pid:
                # Inherited across a fork: the parent's socket. Never touch or collect it (its
                # pool would roll back on the parent's connection from this process).
                _INHERITED.append(held)
            else:
                self._drop_held()
        conn = self.engine.connect()
        try:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="AUTOCOMMIT")
        except BaseException:
            conn.close()
            raise
        self._local.held = (pid, conn)
        return conn

    def _drop_held(self) -> None:
        held = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None and held[0] == os.getpid():
            with contextlib.suppress(Exception):
                held[1].close()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn:
                yield conn
        except OperationalError as exc:
            raise StoreUnavailableError(f"saga store unavailable: {exc.orig}") from exc

    # --- write side ------------------------------------------------------------
    def start(
        self,
        snap: SagaSnapshot,
        decision: Decision,
        *,
        idempotency_key: str | None,
        digest: str | None,
        stall_deadline: datetime | None,
        deadline_at: datetime | None,
        cause: str = "Started",
    ) -> tuple[str, bool]:
        """Record a new saga and its first decision: (the saga's id, whether it is new).

        A start whose id or idempotency key is taken inserts nothing and returns the existing
        saga's id with False (``IdempotencyConflictError`` when the key came with another
        payload). The start row names the instance's steps: its graph, whatever is deployed
        later.
        """
        saga = _saga_params(snap, idempotency_key, digest, stall_deadline, deadline_at)
        entry = self._log_params(snap, decision, cause, None, {"steps": list(snap.steps)})
        if self.dialect == "postgresql":
            params = {**{f"s_{k}": v for k, v in saga.items()}, **entry}
            inserted = self.single("start_pg", params)
        else:
            with self.begin() as conn:
                inserted = count(conn, HOT.get(conn, "insert_saga"), saga)
                if inserted:
                    run(conn, HOT.get(conn, "insert_log"), entry)
        if inserted:
            return snap.id, True
        with self.read() as conn:
            existing = self.find_existing(conn, snap.id, idempotency_key, digest)
        if existing is None:  # pragma: no cover - a conflict names one of the two keys
            raise IdempotencyConflictError(f"saga {snap.id} could not be recorded")
        return existing, False

    def insert_saga(
        self, conn: Connection, snap: SagaSnapshot, decision: Decision, *, cause: str,
        idempotency_key: str | None, digest: str | None, stall_deadline: datetime | None,
        deadline_at: datetime | None,
    ) -> bool:
        """In the caller's transaction (a start that takes semantic locks): the saga row and
        its first log row; False, writing nothing, when its id or key is taken."""
        saga = _saga_params(snap, idempotency_key, digest, stall_deadline, deadline_at)
        if not count(conn, HOT.get(conn, "insert_saga"), saga):
            return False
        self._append(conn, snap, decision, cause, None, {"steps": list(snap.steps)})
        return True

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

    def record_alone(
        self, snap: SagaSnapshot, decision: Decision, *, step: str, fingerprint: str | None,
    ) -> tuple[bool, datetime | None]:
        """Record a success the graph decided (``decide_success_alone``), or nothing.

        Returns (recorded, the saga's start time when this completed it). Nothing is recorded
        when the saga no longer runs on ``fingerprint``'s graph or the success was recorded
        before: the caller then decides under the saga's lock. One statement where the
        database allows it (a single committed INSERT; on PostgreSQL the completion too).
        """
        guard = {"b_saga_id": snap.id, "b_fingerprint": fingerprint or ""}
        entry = self._log_params(snap, decision, "StepSucceeded", step)
        if not decision.saga_changed:
            return bool(self.single("insert_log_if_running", {**entry, **guard})), None
        if self.dialect == "postgresql":
            done = self.single("complete_pg", {**entry, **guard}, rows=True)
            return (True, done[0][0]) if done else (False, None)
        with self.begin() as conn:  # the saga's last step: it completes
            done = run(conn, HOT.get(conn, "complete_if_running"), guard)
            if not done:
                return False, None
            run(conn, HOT.get(conn, "insert_log"), entry)
        return True, done[0][0]

    def single(self, key: str, params: dict[str, Any], *, rows: bool = False) -> Any:
        """One hot statement as a transaction of its own: one round trip, committed by itself.

        The process's main thread runs it on its kept connection (in autocommit: no BEGIN or
        COMMIT round trip); other threads on a pooled one. A connection the server dropped
        (a restart) is replaced and the statement sent once more: every hot statement is
        refused by the database when it already happened (unique keys, conditions), so a
        second send changes nothing. Returns the rows written (or the rows, with ``rows``).
        """
        for tries_left in (1, 0):
            try:
                with self._writing(), self._autocommit() as conn:
                    prepared = HOT.get(conn, key)
                    if conn.dispatch.commit:
                        # The statement is the commit: listeners hear of it as SQLAlchemy's
                        # own commit event says, just before it happens.
                        conn.dispatch.commit(conn)
                    out = run(conn, prepared, params) if rows else count(conn, prepared, params)
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    self._drop_held()
                    if tries_left:
                        continue
                if isinstance(exc, OperationalError | InterfaceError):
                    outages.down(self, exc)
                    raise StoreUnavailableError(f"saga store unavailable: {exc.orig}") from exc
                raise
            outages.up(self)
            return out
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        held = self._held(autocommit=True)
        if held is not None:
            yield held
            return
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    def load(self, conn: Connection, saga_id: str, lock: bool = True) -> SagaSnapshot | None:
        """The saga replayed from its log; under its row lock when ``lock`` (PostgreSQL).

        Lock (and read the saga row) first, the log after: in READ COMMITTED the log is read by
        a statement that starts after the lock is held, so it sees every decision committed
        before ours.
        """
        params = {"b_saga_id": saga_id}
        locking = lock and self.dialect == "postgresql"
        rows = run(conn, HOT.get(conn, "lock" if locking else "load_saga"), params)
        if not rows:
            return None
        name, state, saga_input, error, version, fingerprint = rows[0]
        snap = saga_log.saga_from_row(saga_id, name, state, saga_input, error, version,
                                      fingerprint)
        entries = [entry_of(r) for r in run(conn, HOT.get(conn, "load_log"), params)]
        return saga_log.replay(snap, entries, self._order(name, snap.version))

    def append(
        self,
        conn: Connection,
        snap: SagaSnapshot,
        decision: Decision,
        *,
        cause: str,
        subject: str | None,
        stall_deadline: datetime | None,
        touch: bool = False,
    ) -> datetime | None:
        """Record a decision taken under the saga's lock; returns the saga's start time when
        it settled the saga. The saga row is written only when the saga's state changed (or
        ``touch``: recovery moving its deadline)."""
        self._append(conn, snap, decision, cause, subject)
        if not (decision.saga_changed or touch):
            return None
        returned = run(
            conn, HOT.get(conn, "saga_state"),
            {
                "b_saga_id": snap.id, "b_state": str(snap.state), "b_error": snap.error,
                "b_stall": None if snap.state in SAGA_SETTLED else stall_deadline,
            },
        )
        if decision.saga_changed and snap.state in SAGA_SETTLED and returned:
            return returned[0][0]  # type: ignore[no-any-return]
        return None

    def move_deadline(self, conn: Connection, saga_id: str, stall_deadline: datetime) -> None:
        """Recovery found the saga busy after all: look again at its real deadline."""
        conn.execute(
            update(sagas_t).where(sagas_t.c.id == saga_id).values(stall_deadline=stall_deadline)
        )

    @staticmethod
    def _log_params(
        snap: SagaSnapshot, decision: Decision, cause: str, subject: str | None,
        result: Any = None,
    ) -> dict[str, Any]:
        if subject is not None and any(
            t.step == subject and t.to_state == StepState.SUCCEEDED for t in decision.transitions
        ):
            result = snap.steps[subject].result
        return {
            "saga_id": snap.id, "at": utcnow(), "cause": cause, "step": subject,
            "saga_state": str(snap.state), "transitions": encode_decision(decision),
            "result": result, "dedupe": dedupe_key(cause, decision, subject),
        }

    def _append(
        self, conn: Connection, snap: SagaSnapshot, decision: Decision, cause: str,
        subject: str | None, result: Any = None,
    ) -> None:
        run(conn, HOT.get(conn, "insert_log"),
            self._log_params(snap, decision, cause, subject, result))

    def _order(self, name: str, version: int) -> Sequence[str]:
        order = self.step_order(name, version) if self.step_order is not None else None
        return order or ()

    def log_of(self, conn: Connection, saga_id: str) -> list[LogEntry]:
        return [entry_of(r) for r in conn.execute(
            select(*_ENTRY_COLUMNS).where(log_t.c.saga_id == saga_id).order_by(log_t.c.seq)
        )]

    # --- read side -------------------------------------------------------------
    def get_view(self, saga_id: str) -> dict[str, Any]:
        """The saga as scripts and the API see it (the same JSON everywhere)."""
        with self.read() as conn:
            saga = conn.execute(select(sagas_t).where(sagas_t.c.id == saga_id)).first()
            if saga is None:
                raise SagaNotFoundError(f"no saga with id {saga_id!r}")
            entries = self.log_of(conn, saga_id)
            held = locks.keys_of(conn, [saga_id]).get(saga_id, {"holds": [], "waits": []})
        snap = saga_log.replay(
            saga_log.saga_from_row(saga.id, saga.name, saga.state, saga.input, saga.error,
                                   saga.definition_version, saga.definition_fingerprint),
            entries, self._order(saga.name, int(saga.definition_version or 1)),
        )
        order = self._step_order(saga.name, snap.version, list(snap.steps))
        times = saga_log.step_times(entries)
        events: list[dict[str, Any]] = []
        for entry in entries:
            for t in entry.transitions:
                events.append({
                    "id": len(events) + 1, "step": t.step, "from_state": t.from_state,
                    "to_state": t.to_state, "attempt": t.attempt, "error": t.error,
                    "at": _iso(entry.at), "cause": entry.cause,
                })
        return {
            "id": saga.id,
            "name": saga.name,
            "version": snap.version,
            "fingerprint": saga.definition_fingerprint,
            "state": saga.state,
            "error": saga.error,
            "created_at": _iso(saga.created_at),
            "updated_at": _iso(saga.updated_at),
            "stall_deadline": _iso(saga.stall_deadline),
            "context": {"input": saga.input, "results": snap.results()},
            "locks": held,
            "steps": [
                {
                    "name": n, "state": str(snap.steps[n].state),
                    "attempts": snap.steps[n].attempts,
                    "compensation_attempts": snap.steps[n].compensation_attempts,
                    "error": snap.steps[n].error, "result": snap.steps[n].result,
                    **{k: _iso(v) for k, v in times.get(n, saga_log.StepTimes()).as_dict().items()},
                }
                for n in order
            ],
            "events": events,
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

    def read_outcomes(self, saga_ids: Sequence[str]) -> dict[str, SagaSnapshot]:
        """Many sagas replayed from their logs, in two queries per 500 ids; unknown ids absent."""
        ids = list(dict.fromkeys(saga_ids))
        out: dict[str, SagaSnapshot] = {}
        with self.read() as conn:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                for row in conn.execute(
                    select(sagas_t.c.id, sagas_t.c.name, sagas_t.c.state, sagas_t.c.input,
                           sagas_t.c.error, sagas_t.c.definition_version,
                           sagas_t.c.definition_fingerprint)
                    .where(sagas_t.c.id.in_(chunk))
                ):
                    out[str(row.id)] = saga_log.saga_from_row(
                        str(row.id), row.name, row.state, row.input, row.error,
                        row.definition_version, row.definition_fingerprint,
                    )
                entries: dict[str, list[LogEntry]] = {}
                for log_row in conn.execute(
                    select(log_t.c.saga_id, *_ENTRY_COLUMNS)
                    .where(log_t.c.saga_id.in_(chunk)).order_by(log_t.c.seq)
                ):
                    entries.setdefault(str(log_row[0]), []).append(entry_of(log_row[1:]))
                for saga_id, found in entries.items():
                    snap = out.get(saga_id)
                    if snap is not None:
                        saga_log.replay(snap, found, self._order(snap.name, snap.version))
        return out

    def ordered_steps(self, saga_name: str, version: int, names: list[str]) -> list[str]:
        """Step names in the definition's order (unknown ones last, by name)."""
        return self._step_order(saga_name, version, names)

    def step_states(self, saga_ids: list[str]) -> dict[str, dict[str, str]]:
        return {
            saga_id: {n: str(step.state) for n, step in snap.steps.items()}
            for saga_id, snap in self.read_outcomes(saga_ids).items()
        }

    def _step_order(self, saga_name: str, version: int, names: list[str]) -> list[str]:
        known_order = (
            self.step_order(saga_name, version) if self.step_order is not None else None
        )
        known = [n for n in known_order or () if n in names]
        return known + sorted(n for n in names if n not in known)

    def versions_in_use(self) -> list[dict[str, Any]]:
        """Per saga name, version and fingerprint: instances in flight (live or parked) and all."""
        live = sagas_t.c.state.in_(
            [str(SagaState.PENDING), str(SagaState.WAITING), str(SagaState.RUNNING),
             str(SagaState.COMPENSATING), str(SagaState.COMPENSATION_FAILED),
             str(SagaState.FORWARD_FAILED)]
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


def _saga_params(
    snap: SagaSnapshot, idempotency_key: str | None, digest: str | None,
    stall_deadline: datetime | None, deadline_at: datetime | None,
) -> dict[str, Any]:
    return {
        "id": snap.id, "name": snap.name, "state": str(snap.state), "input": snap.input,
        "idempotency_key": idempotency_key, "input_digest": digest, "error": snap.error,
        "stall_deadline": stall_deadline, "deadline_at": deadline_at, "version": 1,
        "definition_version": snap.version, "definition_fingerprint": snap.fingerprint,
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.isoformat()


def deadline_after(seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=seconds)


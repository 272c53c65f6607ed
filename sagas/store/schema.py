"""The saga store's tables: the durable source of truth for every saga, step and transition."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.functions import FunctionElement


class db_now(FunctionElement[datetime]):  # noqa: N801 - used like the SQL function it names
    """The database clock with sub-second precision on every dialect we support."""

    type = DateTime(timezone=True)
    inherit_cache = True


@compiles(db_now)
def _db_now_default(element: db_now, compiler: Any, **kw: Any) -> str:
    return "CURRENT_TIMESTAMP"


@compiles(db_now, "postgresql")
def _db_now_pg(element: db_now, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    return "strftime('%Y-%m-%d %H:%M:%f', 'now')"


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SagaRow(Base):
    __tablename__ = "saga_instances"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(32))
    input: Mapped[dict[str, Any]] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    input_digest: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=db_now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=db_now())
    # When a saga with work in flight should next be looked at by recovery.
    stall_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Optional whole-saga deadline: past it a running saga compensates.
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, default=0)  # a save counter
    # The definition the instance was started with: every later event is decided with it.
    definition_version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    definition_fingerprint: Mapped[str | None] = mapped_column(String(16))

    __table_args__ = (
        Index("ix_saga_instances_state_stall", "state", "stall_deadline"),
        Index("ix_saga_instances_name_created", "name", "created_at"),
        Index("ix_saga_instances_name_definition_version", "name", "definition_version"),
    )


class LogRow(Base):
    """One committed decision of a saga (``sagas.store.log``): the truth, the history, the outbox.

    No foreign key to ``saga_instances``: every writer checks the saga in the same statement
    (or holds its lock), and a foreign key would add a lookup to every insert.
    """

    __tablename__ = "saga_log"

    seq: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    cause: Mapped[str] = mapped_column(String(32))  # the event: Started, StepSucceeded, ...
    step: Mapped[str | None] = mapped_column(String(100))  # the step the event was about
    saga_state: Mapped[str] = mapped_column(String(32))  # the saga's state after the decision
    transitions: Mapped[list[Any]] = mapped_column(JSON)
    result: Mapped[Any | None] = mapped_column(JSON)  # the step's result, on its success
    # Set on decisions that may happen once (start, a success): the unique index refuses a copy.
    dedupe: Mapped[str | None] = mapped_column(String(120))
    # PostgreSQL: the writing transaction's id, so the relay reads in commit-safe order.
    txid: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("uq_saga_log_saga_id_dedupe", "saga_id", "dedupe", unique=True),
        Index("ix_saga_log_txid_seq", "txid", "seq").ddl_if(dialect="postgresql"),
    )


class RelayCursor(Base):
    """How far each relay has published the log, and who holds the lease to go on."""

    __tablename__ = "saga_relay_cursor"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, default=0)  # last relayed seq
    position_txid: Mapped[int] = mapped_column(BigInteger, default=0)  # its txid (PostgreSQL)
    owner: Mapped[str | None] = mapped_column(String(100))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LockRow(Base):
    """A semantic lock: the saga that holds a key (``Saga(locks=...)``), until it settles."""

    __tablename__ = "saga_locks"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    taken_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=db_now())


class LockWaitRow(Base):
    """A saga waiting for one key, in arrival order (``seq``) behind that key's holder."""

    __tablename__ = "saga_lock_waits"

    seq: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(200))
    saga_id: Mapped[str] = mapped_column(String(64), index=True)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=db_now())

    __table_args__ = (Index("ix_saga_lock_waits_key_seq", "key", "seq"),)

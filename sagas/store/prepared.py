"""Hot-path statements compiled once per dialect and run on the DBAPI cursor.

A transition runs five short statements; through ``Connection.execute`` each one pays for
SQLAlchemy's per-execution machinery (parameter coercion, execution context, result wrapping),
which cost several times what SQLite spends running it (docs/performance.md). Here the Core
construct is compiled once, its bind and result processors are looked up once, and each call only
orders the parameters and hands them to the driver's cursor, inside the caller's SQLAlchemy
transaction (same connection, same BEGIN/COMMIT, same pool). What still goes through SQLAlchemy:
driver errors are re-raised as SQLAlchemy's exception classes (so ``IntegrityError`` and
``OperationalError`` handling is unchanged), a disconnect invalidates the connection, and the
engine's ``before_cursor_execute`` and ``after_cursor_execute`` listeners see every statement
(statement and row counters, tracing).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement

log = logging.getLogger("sagas.sql")

Params = Mapping[str, Any]


class Prepared:
    """One statement for one dialect: SQL text, parameter order and value converters."""

    __slots__ = (
        "columns",
        "defaults",
        "names",
        "plan",
        "positional",
        "processors",
        "results",
        "sql",
    )

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None
    ) -> None:
        compiled: Any = statement.compile(  # a SQLCompiler: positional, binds, positiontup
            dialect=dialect, column_keys=list(column_keys) if column_keys else None,
            for_executemany=True,  # no implicit RETURNING of generated ids
        )
        self.sql: str = compiled.string
        self.positional: bool = bool(compiled.positional)
        self.names: list[str] = (
            list(compiled.positiontup or ()) if self.positional else list(compiled.binds)
        )
        # Literals folded into the statement as bind parameters (``version + 1``).
        self.defaults: dict[str, Any] = {
            name: bind.value for name, bind in compiled.binds.items()
            if not bind.required and not callable(bind.value)
        }
        self.processors: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor
        self.plan: list[tuple[str, Any]] = [(n, self.processors.get(n)) for n in self.names]
        # Result columns: name -> converter (None when the driver's value is already right).
        self.columns: list[str] = []
        self.results: list[Any] = []
        for column in getattr(statement, "exported_columns", None) or ():
            self.columns.append(column.key)
            self.results.append(column.type.dialect_impl(dialect).result_processor(dialect, None))

    def bind(self, params: Params) -> Any:
        values = {**self.defaults, **params} if self.defaults else params
        if self.positional:
            return tuple([values[n] if p is None else p(values[n]) for n, p in self.plan])
        return {n: values[n] if p is None else p(values[n]) for n, p in self.plan}

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple([
            value if convert is None else convert(value)
            for value, convert in zip(raw, self.results, strict=False)
        ])


def execute(
    conn: Connection, prepared: Prepared, params: Params | Sequence[Params]
) -> list[tuple[Any, ...]]:
    """Run on the connection's DBAPI cursor; a list of params runs as one executemany.

    Returns the result rows, converted, for statements that produce rows (else ``[]``).
    """
    bound: list[Any] | Any
    if isinstance(params, Mapping):
        bound = prepared.bind(params)
        many = False
    else:
        bound = [prepared.bind(p) for p in params]
        many = True
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    try:
        if conn.dispatch.before_cursor_execute:
            for listener in conn.dispatch.before_cursor_execute:
                listener(conn, cursor, prepared.sql, bound, None, many)
        if conn.engine.echo:
            log.info("%s %r", prepared.sql, bound)
        if many:
            cursor.executemany(prepared.sql, bound)
        else:
            cursor.execute(prepared.sql, bound)
        rows = [] if many or cursor.description is None else cursor.fetchall()
        if conn.dispatch.after_cursor_execute:  # after the fetch: RETURNING's rowcount is known
            for listener in conn.dispatch.after_cursor_execute:
                listener(conn, cursor, prepared.sql, bound, None, many)
        return [prepared.row(r) for r in rows]
    except conn.dialect.loaded_dbapi.Error as exc:
        if conn.dialect.is_disconnect(exc, dbapi_conn, cursor):
            conn.invalidate(exc)
        raise DBAPIError.instance(
            prepared.sql, bound, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()


def count(conn: Connection, prepared: Prepared, params: Params) -> int:
    """Run one DML statement on the DBAPI cursor; returns the number of rows it wrote."""
    bound = prepared.bind(params)
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    try:
        if conn.dispatch.before_cursor_execute:
            for listener in conn.dispatch.before_cursor_execute:
                listener(conn, cursor, prepared.sql, bound, None, False)
        if conn.engine.echo:
            log.info("%s %r", prepared.sql, bound)
        cursor.execute(prepared.sql, bound)
        if conn.dispatch.after_cursor_execute:
            for listener in conn.dispatch.after_cursor_execute:
                listener(conn, cursor, prepared.sql, bound, None, False)
        return int(cursor.rowcount or 0)
    except conn.dialect.loaded_dbapi.Error as exc:
        if conn.dialect.is_disconnect(exc, dbapi_conn, cursor):
            conn.invalidate(exc)
        raise DBAPIError.instance(
            prepared.sql, bound, exc, conn.dialect.loaded_dbapi.Error, dialect=conn.dialect
        ) from exc
    finally:
        cursor.close()


Statement = ClauseElement | Callable[[str], ClauseElement]
"""A Core statement, or a function of the dialect's name that builds one (ON CONFLICT, ...)."""


class PreparedSet:
    """Statements of one store, compiled lazily for the dialect of the connection using them."""

    def __init__(self, statements: Mapping[str, tuple[Statement, Sequence[str] | None]]):
        self._statements = statements
        self._compiled: dict[tuple[str, str], Prepared] = {}

    def get(self, conn: Connection, key: str) -> Prepared:
        dialect = conn.dialect
        found = self._compiled.get((dialect.name, key))
        if found is None:
            statement, column_keys = self._statements[key]
            if not isinstance(statement, ClauseElement):
                statement = statement(dialect.name)
            found = Prepared(statement, dialect, column_keys)
            self._compiled[(dialect.name, key)] = found
        return found

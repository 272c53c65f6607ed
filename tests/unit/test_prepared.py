"""The DBAPI hot path must write and read exactly what SQLAlchemy Core would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.exc import IntegrityError

from sagas.store.prepared import PreparedSet, count, execute
from sagas.store.schema import Base
from sagas.store.sql import _COMPLETE_IF_RUNNING, _LOAD_LOG, _SAGA_STATE, HOT, log_t, sagas_t

LOCAL = PreparedSet({
    "insert_saga_plain": (insert(sagas_t), ("id", "name", "state", "input", "stall_deadline",
                                            "version", "definition_version")),
    "load_log": (_LOAD_LOG, None),
    "settle": (_SAGA_STATE, None),
    "complete": (_COMPLETE_IF_RUNNING, None),
})
AT = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _insert(conn, saga_id: str = "s1") -> int:
    written = count(conn, HOT.get(conn, "insert_saga"), {
        "id": saga_id, "name": "order", "state": "RUNNING", "input": {"qty": 2, "sku": "A"},
        "idempotency_key": None, "input_digest": None, "error": None,
        "stall_deadline": AT, "deadline_at": None, "version": 1,
        "definition_version": 2, "definition_fingerprint": "abc",
    })
    execute(conn, HOT.get(conn, "insert_log"), [
        {"saga_id": saga_id, "at": AT, "cause": "StepSucceeded", "step": n,
         "saga_state": "RUNNING", "transitions": [[n, "RUNNING", "SUCCEEDED", 1]],
         "result": {"n": n}, "dedupe": f"{n}:SUCCEEDED"}
        for n in ("reserve", "charge")
    ])
    return written


def test_rows_written_on_the_cursor_read_back_through_core_unchanged(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
    with engine.connect() as conn:
        saga = conn.execute(select(sagas_t)).one()
        rows = conn.execute(select(log_t).order_by(log_t.c.seq)).all()
    assert saga.input == {"qty": 2, "sku": "A"}
    assert saga.stall_deadline.replace(tzinfo=None) == datetime(2026, 1, 2, 3, 4, 5, 600000)
    assert [(r.step, r.result, r.transitions) for r in rows] == [
        ("reserve", {"n": "reserve"}, [["reserve", "RUNNING", "SUCCEEDED", 1]]),
        ("charge", {"n": "charge"}, [["charge", "RUNNING", "SUCCEEDED", 1]]),
    ]


def test_the_log_read_converts_json_and_times_like_core(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
        rows = execute(conn, LOCAL.get(conn, "load_log"), {"b_saga_id": "s1"})
        core = conn.execute(_LOAD_LOG, {"b_saga_id": "s1"}).all()
    assert rows == [tuple(r) for r in core]
    assert rows[0][5] == [["reserve", "RUNNING", "SUCCEEDED", 1]]
    assert isinstance(rows[0][1], datetime)


def test_update_returning_hands_back_a_datetime(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
        returned = execute(conn, LOCAL.get(conn, "settle"), {
            "b_saga_id": "s1", "b_state": "COMPLETED", "b_error": None, "b_stall": None,
        })
    assert isinstance(returned[0][0], datetime)


def test_a_conditional_update_binds_its_literals_and_writes_only_when_the_condition_holds(
    engine,
) -> None:
    with engine.begin() as conn:
        _insert(conn)
        first = execute(conn, LOCAL.get(conn, "complete"),
                        {"b_saga_id": "s1", "b_fingerprint": "abc"})
        again = execute(conn, LOCAL.get(conn, "complete"),
                        {"b_saga_id": "s1", "b_fingerprint": "abc"})
        saga = conn.execute(select(sagas_t.c.state, sagas_t.c.stall_deadline)).one()
    assert len(first) == 1 and again == []
    assert (saga.state, saga.stall_deadline) == ("COMPLETED", None)


def test_an_insert_that_does_nothing_on_conflict_counts_zero_rows(engine) -> None:
    with engine.begin() as conn:
        assert _insert(conn) == 1
        assert count(conn, HOT.get(conn, "insert_saga"), {
            "id": "s1", "name": "order", "state": "RUNNING", "input": {},
            "idempotency_key": None, "input_digest": None, "error": None,
            "stall_deadline": None, "deadline_at": None, "version": 1,
            "definition_version": 1, "definition_fingerprint": None,
        }) == 0


def test_a_duplicate_key_raises_sqlalchemys_integrity_error(engine) -> None:
    params = {"id": "s1", "name": "order", "state": "RUNNING", "input": {},
              "stall_deadline": None, "version": 1, "definition_version": 1}
    with engine.begin() as conn:
        execute(conn, LOCAL.get(conn, "insert_saga_plain"), params)
    with pytest.raises(IntegrityError, match="UNIQUE"), engine.begin() as conn:
        execute(conn, LOCAL.get(conn, "insert_saga_plain"), params)


def test_statement_listeners_see_every_statement(engine) -> None:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *a: seen.append(statement.split()[0]))
    with engine.begin() as conn:
        _insert(conn)
    assert seen == ["INSERT", "INSERT"]

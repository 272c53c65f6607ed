"""The DBAPI hot path must write and read exactly what SQLAlchemy Core would."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, insert, select
from sqlalchemy.exc import IntegrityError

from sagas.store.prepared import PreparedSet, execute
from sagas.store.schema import Base
from sagas.store.sql import _LOAD, _UPDATE_SAGA_SETTLE, sagas_t, steps_t

HOT = PreparedSet({
    "insert_saga": (insert(sagas_t), ("id", "name", "state", "input", "stall_deadline",
                                      "version")),
    "insert_steps": (insert(steps_t), ("saga_id", "name", "state", "attempts",
                                       "compensation_attempts", "result")),
    "load": (_LOAD, None),
    "settle": (_UPDATE_SAGA_SETTLE, None),
})


@pytest.fixture
def engine(tmp_path: Path):
    engine = create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    Base.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _insert(conn, saga_id: str = "s1") -> None:
    execute(conn, HOT.get(conn, "insert_saga"), {
        "id": saga_id, "name": "order", "state": "RUNNING", "input": {"qty": 2, "sku": "A"},
        "stall_deadline": datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC), "version": 1,
        "definition_version": 2, "definition_fingerprint": "abc",
    })
    execute(conn, HOT.get(conn, "insert_steps"), [
        {"saga_id": saga_id, "name": n, "state": "PENDING", "attempts": 0,
         "compensation_attempts": 0, "result": {"n": n}}
        for n in ("reserve", "charge")
    ])


def test_rows_written_on_the_cursor_read_back_through_core_unchanged(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
    with engine.connect() as conn:
        saga = conn.execute(select(sagas_t)).one()
        steps = conn.execute(select(steps_t).order_by(steps_t.c.name)).all()
    assert saga.input == {"qty": 2, "sku": "A"}
    assert saga.stall_deadline.replace(tzinfo=None) == datetime(2026, 1, 2, 3, 4, 5, 600000)
    assert [(s.name, s.result) for s in steps] == [
        ("charge", {"n": "charge"}), ("reserve", {"n": "reserve"}),
    ]


def test_load_converts_json_columns_like_core(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
        rows = execute(conn, HOT.get(conn, "load"), {"b_saga_id": "s1"})
        core = conn.execute(_LOAD, {"b_saga_id": "s1"}).all()
    assert sorted(rows) == sorted(tuple(r) for r in core)
    assert rows[0][2] == {"qty": 2, "sku": "A"}


def test_update_returning_hands_back_a_datetime(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
        returned = execute(conn, HOT.get(conn, "settle"), {
            "b_saga_id": "s1", "b_state": "COMPLETED", "b_error": None, "b_stall": None,
        })
        version = conn.execute(select(sagas_t.c.version)).scalar_one()
    assert isinstance(returned[0][0], datetime)
    assert version == 2  # the literal ``version + 1`` is bound too


def test_a_duplicate_key_raises_sqlalchemys_integrity_error(engine) -> None:
    with engine.begin() as conn:
        _insert(conn)
    with pytest.raises(IntegrityError, match="UNIQUE"), engine.begin() as conn:
        _insert(conn)


def test_statement_listeners_see_every_statement(engine) -> None:
    seen: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *a: seen.append(statement.split()[0]))
    with engine.begin() as conn:
        _insert(conn)
    assert seen == ["INSERT", "INSERT"]

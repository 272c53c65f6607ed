"""Upgrading a store written before the saga log: history carried over, sagas in flight go on."""

from __future__ import annotations

from pathlib import Path

from celery import Celery
from sqlalchemy import create_engine, inspect, text

import sagas
from sagas.coordinator import StepSucceeded
from sagas.runtime import relay
from sagas.runtime.transitions import apply_event
from sagas.store import migrate

TRIP = sagas.Saga("trip", steps=[
    sagas.Step("hold", action="trip.hold", compensation="trip.release"),
    sagas.Step("pay", action="trip.pay"),
])


def _old_store(url: str) -> None:
    """A store at sagas_0004 with one finished and one running saga, as the old engine wrote."""
    engine = create_engine(url)
    migrate.upgrade(engine, "sagas_0004")
    with engine.begin() as conn:
        for saga_id, state in (("done", "COMPLETED"), ("busy", "RUNNING")):
            conn.execute(text(
                "INSERT INTO saga_instances (id, name, state, input, version, "
                "definition_version, stall_deadline) VALUES (:id, 'trip', :state, '{}', 3, 1, "
                "NULL)"), {"id": saga_id, "state": state})
        conn.execute(text(
            "INSERT INTO saga_steps (saga_id, name, state, attempts, compensation_attempts, "
            "result) VALUES ('done', 'hold', 'SUCCEEDED', 1, 0, '{\"room\": 7}'), "
            "('done', 'pay', 'SUCCEEDED', 1, 0, '{}'), "
            "('busy', 'hold', 'SUCCEEDED', 1, 0, '{\"room\": 9}'), "
            "('busy', 'pay', 'RUNNING', 1, 0, NULL)"))
        conn.execute(text(
            "INSERT INTO saga_events (saga_id, step, from_state, to_state, attempt) VALUES "
            "('done', NULL, 'PENDING', 'RUNNING', 0), ('done', 'hold', 'PENDING', 'RUNNING', 1),"
            "('done', 'hold', 'RUNNING', 'SUCCEEDED', 1), ('done', 'pay', 'PENDING', 'RUNNING', 1),"
            "('done', 'pay', 'RUNNING', 'SUCCEEDED', 1), ('done', NULL, 'RUNNING', 'COMPLETED', 0),"
            "('busy', NULL, 'PENDING', 'RUNNING', 0), ('busy', 'hold', 'PENDING', 'RUNNING', 1),"
            "('busy', 'hold', 'RUNNING', 'SUCCEEDED', 1), ('busy', 'pay', 'PENDING', 'RUNNING', 1)"
        ))
    engine.dispose()


def test_an_old_store_upgrades_to_the_log_with_its_history_and_sagas_in_flight_go_on(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    _old_store(url)
    engine = sagas.Sagas(Celery("migrated", broker="memory://"),
                         sagas.SagaSettings(database_url=url, sagas_listeners=""))
    engine.register(TRIP)
    published: list[str] = []
    engine._binding.publisher = lambda b, s, snap, dispatches: published.extend(
        d.step for d in dispatches)

    engine.upgrade_schema()

    tables = set(inspect(engine.store.engine).get_table_names())
    assert {"saga_log", "saga_relay_cursor"} <= tables
    assert not {"saga_steps", "saga_events", "saga_outbox"} & tables
    done = engine.handle("done").outcome()
    assert done.state is sagas.SagaState.COMPLETED
    assert {n: s.state for n, s in done.steps.items()} == {
        "hold": sagas.StepState.SUCCEEDED, "pay": sagas.StepState.SUCCEEDED}
    assert done.steps["hold"].result == {"room": 7}
    view = engine.store.get_view("done")
    assert [(e["step"], e["to_state"]) for e in view["events"]] == [
        (None, "RUNNING"), ("hold", "RUNNING"), ("hold", "SUCCEEDED"), ("pay", "RUNNING"),
        ("pay", "SUCCEEDED"), (None, "COMPLETED")]
    assert relay.stats(engine.store).pending == 0, "history is not published again"

    decision = apply_event(engine._binding, "busy", StepSucceeded("pay", "action", {"ok": 1}))

    assert decision.ignored is None
    finished = engine.handle("busy").outcome()
    assert finished.state is sagas.SagaState.COMPLETED
    assert finished.steps["hold"].result == {"room": 9}
    assert relay.stats(engine.store).pending == 1, "new decisions are relayed"

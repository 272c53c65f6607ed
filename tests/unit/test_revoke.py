"""Calling off queued actions: which messages a worker checks (and what that costs), what it
does with one whose saga is rolling back, and how a message Celery revoked is reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from sagas import Saga, Sagas, SagaSettings, SagaState, Step
from sagas.coordinator import ACTION, Dispatch
from sagas.runtime import revoke
from sagas.runtime.dispatch import build_signature
from sagas.store.sql import Store
from sagas.testing import SagaRunner


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An engine on a SQLite file, its step task, and what the worker reports."""
    app = Celery("revoke-unit", broker="memory://", set_as_current=False)
    engine = Sagas(app, SagaSettings(database_url=f"sqlite:///{tmp_path}/s.db",
                                     sagas_listeners=""))
    engine.upgrade_schema()
    ran: list[dict[str, Any]] = []

    @app.task(name="unit.act", shared=False)
    def act(ctx: dict[str, Any]) -> dict[str, Any]:
        ran.append(ctx)
        return {}

    saga = engine.register(Saga("u", [Step("a", action=act), Step("b", action=act)]))
    sent: list[Any] = []
    engine._binding.publisher = lambda *args: sent.append(args)
    engine._binding.revoker = None
    reports: list[tuple[Any, ...]] = []
    saved = revoke.report, revoke._connected
    revoke.report = lambda *args: reports.append(args[2:])  # type: ignore[assignment]
    try:
        yield {"app": app, "engine": engine, "saga": saga, "ran": ran, "reports": reports,
               "task": app.tasks["unit.act"]}
    finally:
        revoke.report, revoke._connected = saved  # type: ignore[assignment]


def _message(w: dict[str, Any], saga_id: str, step: str, sent: float) -> dict[str, Any]:
    engine: Sagas = w["engine"]
    snap = engine.store.read_outcomes([saga_id])[saga_id]
    sig = build_signature(w["app"], "saga", w["saga"], snap, Dispatch(step, ACTION, 1))
    ctx = dict(sig.args[0])
    ctx["sent"] = sent
    return ctx


def _cancelled(w: dict[str, Any]) -> str:
    engine: Sagas = w["engine"]
    engine._binding.revoker = lambda binding, ids: None  # the broadcast: not heard here
    saga_id = engine.start(w["saga"], {}).id
    engine.cancel(saga_id)
    engine._binding.revoker = None
    assert engine.handle(saga_id).state is SagaState.COMPENSATING
    return saga_id


def test_a_message_sent_while_the_worker_was_connected_costs_no_read(
    worker: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    saga_id = _cancelled(worker)
    revoke.track_connections()
    revoke.connected(1000.0)

    def no_read(*_: Any, **__: Any) -> Any:
        raise AssertionError("the store was read for a message sent while connected")

    ctx = _message(worker, saga_id, "a", sent=1000.0 + revoke.CONNECT_MARGIN + 1)
    monkeypatch.setattr(Store, "read", no_read)
    worker["task"].apply(args=(ctx,), task_id=f"{saga_id}.a.do.1")
    assert len(worker["ran"]) == 1, "a revoke sent to it would have been heard: it runs"


def test_a_message_older_than_the_connection_is_checked_and_refused_when_called_off(
    worker: dict[str, Any],
):
    saga_id = _cancelled(worker)
    revoke.track_connections()
    revoke.connected(1000.0)
    ctx = _message(worker, saga_id, "a", sent=999.0)
    result = worker["task"].apply(args=(ctx,), task_id=f"{saga_id}.a.do.1")
    assert result.state == "IGNORED"
    assert worker["ran"] == [], "never run"
    assert worker["reports"] == [(f"{saga_id}.a.do.1", saga_id, "a", "action", 1)]


def test_a_saga_rolling_back_after_a_failure_was_not_called_off_its_actions_run(
    worker: dict[str, Any],
):
    engine: Sagas = worker["engine"]
    revoke._connected = None  # every action is checked
    saga_id = engine.start(worker["saga"], {}).id
    from sagas.coordinator import StepFailed
    from sagas.runtime.transitions import apply_event

    apply_event(engine._binding, saga_id, StepFailed("a", ACTION, "BusinessError: no"))
    assert engine.handle(saga_id).state is SagaState.COMPENSATED
    assert not revoke.called_off(engine.store, saga_id)
    assert revoke.called_off(engine.store, _cancelled(worker))


def test_outside_a_worker_every_action_is_checked(worker: dict[str, Any]):
    revoke._connected = None
    saga_id = worker["engine"].start(worker["saga"], {}).id  # running: it runs
    ctx = _message(worker, saga_id, "a", sent=10**10)
    worker["task"].apply(args=(ctx,), task_id=f"{saga_id}.a.do.1")
    assert len(worker["ran"]) == 1 and worker["reports"] == []
    called_off = _cancelled(worker)
    worker["task"].apply(args=(_message(worker, called_off, "a", sent=10**10),),
                         task_id=f"{called_off}.a.do.1")
    assert len(worker["ran"]) == 1 and len(worker["reports"]) == 1


def test_a_revoked_request_is_reported_from_its_failure_callback(worker: dict[str, Any]):
    engine: Sagas = worker["engine"]
    errback = {"task": "sagas.step_failed", "args": ["s-1", "a", "action", 2],
               "options": {}, "subtask_type": None, "kwargs": {}, "immutable": False}

    class Request:
        id = "s-1.a.do.2"
        errbacks = [errback]

    assert revoke.report_revoked_request(engine._binding, Request())
    assert worker["reports"] == [("s-1.a.do.2", "s-1", "a", "action", 2)]

    class Plain:
        id = "other"
        errbacks = None

    assert not revoke.report_revoked_request(engine._binding, Plain())


def test_in_the_testing_kit_a_cancelled_saga_never_runs_what_was_queued():
    calls: list[str] = []
    saga = Saga("k_cancel", [
        Step("a", "svc.a", compensation="svc.undo_a", depends_on=()),
        Step("b", "svc.b", compensation="svc.undo_b", depends_on=()),
    ])
    participants = {n: (lambda name: lambda ctx: calls.append(name))(n)
                    for n in ("svc.a", "svc.b", "svc.undo_a", "svc.undo_b")}
    with SagaRunner(saga, participants=participants) as runner:
        saga_id = runner.start(saga, {})  # a and b are queued, not run
        result = runner.cancel(saga_id)
    assert result.state is SagaState.COMPENSATED
    assert sorted(calls) == ["svc.undo_a", "svc.undo_b"], "the actions never ran"
    assert result.steps["a"].error == "ActionRevoked: " + revoke.REVOKED

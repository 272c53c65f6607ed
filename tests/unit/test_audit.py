"""The engine's own audit (sagas.ops.audit) on a store of non-order sagas, written row by row."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import insert

import sagas
from sagas.ops import audit as audit_mod
from sagas.ops.audit import (
    DEFINITION_UNKNOWN,
    PARKED,
    RULE_COMPENSATED,
    RULE_COMPLETED,
    RULE_DEADLINE,
    RULE_EVENTS,
    RULE_IDLE,
    STUCK,
    AuditReport,
    Finding,
    audit,
    audit_idle,
)
from sagas.store.sql import log_t, sagas_t, utcnow

NOW = utcnow()
HOUR = timedelta(hours=1)

TRIP = sagas.Saga(
    "trip",
    steps=[
        sagas.Step("hold_flight", action="trip.hold_flight", compensation="trip.release_flight",
                   depends_on=()),
        sagas.Step("hold_hotel", action="trip.hold_hotel", compensation="trip.release_hotel",
                   depends_on=()),
        sagas.Step("charge", action="trip.charge", pivot=True,
                   depends_on=("hold_flight", "hold_hotel")),
    ],
)

# Each step: its state, then the to_states of its transitions in order (from PENDING); the
# state is what the log replays to (written here only as a reminder of it).
DONE = {"hold_flight": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"]),
        "hold_hotel": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"]),
        "charge": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"])}
ROLLED_BACK = {"hold_flight": ("COMPENSATED", ["RUNNING", "SUCCEEDED", "COMPENSATING",
                                               "COMPENSATED"]),
               "hold_hotel": ("FAILED", ["RUNNING", "FAILED"]),
               "charge": ("SKIPPED", ["SKIPPED"])}


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sagas.Sagas]:
    app = Celery("audit-test", broker="memory://")
    eng = sagas.Sagas(app, sagas.SagaSettings(
        database_url=f"sqlite:///{tmp_path}/a.db", sagas_listeners="",
    ))
    eng.upgrade_schema()
    eng.register(TRIP)
    yield eng


def write_saga(
    engine: sagas.Sagas,
    saga_id: str,
    state: str,
    steps: dict[str, tuple[str, list[str]]],
    *,
    name: str = "trip",
    stall_deadline: datetime | None = None,
    deadline_at: datetime | None = None,
    log_state: str | None = None,
) -> None:
    """One saga row and its log, exactly as given (no coordinator involved): a start row naming
    the steps, then one row per step transition, each leaving the saga ``log_state``."""
    after = log_state or state
    rows: list[dict[str, Any]] = [{
        "saga_id": saga_id, "at": NOW, "cause": "Started", "step": None, "saga_state": after,
        "transitions": [[None, "PENDING", "RUNNING", 0]], "result": {"steps": list(steps)},
    }]
    for step, (_, to_states) in steps.items():
        previous = "PENDING"
        for to_state in to_states:
            rows.append({"saga_id": saga_id, "at": NOW, "cause": "Written", "step": step,
                         "saga_state": after,
                         "transitions": [[step, previous, to_state, 1]], "result": None})
            previous = to_state
    with engine.store.begin() as conn:
        conn.execute(insert(sagas_t).values(
            id=saga_id, name=name, state=state, input={}, version=1,
            stall_deadline=stall_deadline, deadline_at=deadline_at,
        ))
        conn.execute(insert(log_t), rows)


def write_broken_store(engine: sagas.Sagas) -> None:
    write_saga(engine, "ok-completed", "COMPLETED", DONE)
    write_saga(engine, "ok-compensated", "COMPENSATED", ROLLED_BACK)
    write_saga(engine, "completed-with-failed-step", "COMPLETED",
               DONE | {"charge": ("FAILED", ["RUNNING", "FAILED"])})
    write_saga(engine, "compensated-flight-still-held", "COMPENSATED",
               ROLLED_BACK | {"hold_flight": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"])})
    write_saga(engine, "history-skips-running", "COMPLETED",
               DONE | {"hold_hotel": ("SUCCEEDED", ["SUCCEEDED"])})
    write_saga(engine, "row-disagrees-with-log", "COMPLETED", DONE, log_state="RUNNING")
    write_saga(engine, "running-stalled-an-hour", "RUNNING",
               {"hold_flight": ("RUNNING", ["RUNNING"]), "hold_hotel": ("RUNNING", ["RUNNING"]),
                "charge": ("PENDING", [])},
               stall_deadline=NOW - HOUR)
    write_saga(engine, "parked", "COMPENSATION_FAILED",
               {"hold_flight": ("COMPENSATION_FAILED", ["RUNNING", "SUCCEEDED", "COMPENSATING",
                                                        "COMPENSATION_FAILED"]),
                "hold_hotel": ("COMPENSATED", ["RUNNING", "SUCCEEDED", "COMPENSATING",
                                               "COMPENSATED"]),
                "charge": ("SKIPPED", ["SKIPPED"])})


BROKEN = {
    ("completed-with-failed-step", RULE_COMPLETED),
    ("compensated-flight-still-held", RULE_COMPENSATED),
    ("history-skips-running", RULE_EVENTS),
    ("row-disagrees-with-log", RULE_EVENTS),
    ("running-stalled-an-hour", RULE_DEADLINE),
    ("running-stalled-an-hour", STUCK),
    ("parked", PARKED),
}


def reported(report: AuditReport) -> set[tuple[str | None, str]]:
    return {(f.saga_id, f.rule) for f in report.findings}


# --- a clean store --------------------------------------------------------------------------
def test_a_clean_store_of_non_order_sagas_is_ok_and_every_saga_was_checked(
    engine: sagas.Sagas,
) -> None:
    write_saga(engine, "ok-completed", "COMPLETED", DONE)
    write_saga(engine, "ok-compensated", "COMPENSATED", ROLLED_BACK)

    report = audit(engine, now=NOW)

    assert report.ok
    assert report.findings == []
    assert report.sagas == 2
    # Per saga: its terminal-state rule, the events rule, the deadline rule, the idle rule.
    assert report.checks == 2 * 4
    assert report.states == {"COMPLETED": 1, "COMPENSATED": 1}
    assert report.checks_run == [RULE_COMPLETED, RULE_COMPENSATED, RULE_EVENTS, RULE_DEADLINE,
                                 RULE_IDLE]
    assert report.summary() == "audit: 2 sagas (COMPENSATED 1, COMPLETED 1), 8 checks: ok"
    assert report.as_dict() == {
        "ok": True, "sagas": 2, "checks": 8, "states": {"COMPLETED": 1, "COMPENSATED": 1},
        "violations": [], "checks_run": report.checks_run,
    }


def test_an_empty_store_is_ok_with_no_checks(engine: sagas.Sagas) -> None:
    report = audit(engine)
    assert report.ok
    assert (report.sagas, report.checks, report.states) == (0, 0, {})
    assert report.summary() == "audit: 0 sagas (none), 0 checks: ok"


# --- the engine's rules ---------------------------------------------------------------------
def test_each_broken_saga_is_reported_under_its_rule_and_no_other(engine: sagas.Sagas) -> None:
    write_broken_store(engine)

    report = audit(engine, now=NOW)

    assert not report.ok
    assert report.sagas == 8
    assert report.checks > 0
    assert reported(report) == BROKEN
    assert len(report.findings) == len(BROKEN)
    assert report.states == {"COMPLETED": 4, "COMPENSATED": 2, "RUNNING": 1,
                             "COMPENSATION_FAILED": 1}
    details = {(f.saga_id, f.rule): f.detail for f in report.findings}
    assert "'charge' is FAILED" in details["completed-with-failed-step", RULE_COMPLETED]
    assert "'hold_flight' is SUCCEEDED" in details[
        "compensated-flight-still-held", RULE_COMPENSATED]
    assert details["history-skips-running", RULE_EVENTS].startswith(
        "step 'hold_hotel': PENDING -> SUCCEEDED (log row ")
    assert details["history-skips-running", RULE_EVENTS].endswith("is not an allowed transition")
    assert details["row-disagrees-with-log", RULE_EVENTS] == (
        "the saga is COMPLETED but its last log row (Written) left it RUNNING")
    assert "stall deadline" in details["running-stalled-an-hour", RULE_DEADLINE]
    assert report.summary().endswith(f": {len(BROKEN)} violations")
    violations = report.as_dict()["violations"]
    assert {(v["saga"], v["rule"]) for v in violations} == BROKEN
    assert all(set(v) == {"saga", "rule", "detail"} for v in violations)


def test_a_step_the_log_never_moved_is_pending(engine: sagas.Sagas) -> None:
    write_saga(engine, "charge-without-events", "COMPLETED",
               DONE | {"charge": ("PENDING", [])})
    write_saga(engine, "pending-without-events", "RUNNING",
               {"hold_flight": ("RUNNING", ["RUNNING"]), "hold_hotel": ("RUNNING", ["RUNNING"]),
                "charge": ("PENDING", [])}, stall_deadline=NOW + HOUR)

    report = audit(engine, idle=False, now=NOW)

    assert [(f.saga_id, f.rule, f.detail) for f in report.findings] == [
        ("charge-without-events", RULE_COMPLETED, "step 'charge' is PENDING"),
    ]


def test_a_compensated_saga_of_an_unregistered_definition_is_not_guessed_at(
    engine: sagas.Sagas,
) -> None:
    write_saga(engine, "legacy-1", "COMPENSATED",
               {"book": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"]),
                "notify": ("RUNNING", ["RUNNING"]),
                "audit_log": ("FAILED", ["RUNNING", "COMPENSATING"])},
               name="legacy")
    write_saga(engine, "legacy-2", "COMPLETED", {"book": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"])},
               name="legacy")

    report = audit(engine, now=NOW)

    # The definition-free checks still ran: steps left in flight, a history the transition
    # table refuses. A SUCCEEDED step is not judged (its compensation is unknown); a COMPLETED
    # saga needs no definition at all.
    assert reported(report) == {
        ("legacy-1", DEFINITION_UNKNOWN),
        ("legacy-1", RULE_COMPENSATED),
        ("legacy-1", RULE_EVENTS),
    }
    assert {f.detail for f in report.findings if f.rule == RULE_COMPENSATED} == {
        "step 'notify' is still RUNNING", "step 'audit_log' is still COMPENSATING"}
    assert report.sagas == 2


def test_a_succeeded_step_without_compensation_may_stay_in_a_compensated_saga(
    engine: sagas.Sagas,
) -> None:
    write_saga(engine, "charged-then-undone", "COMPENSATED",
               ROLLED_BACK | {"charge": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"])})

    assert audit(engine, now=NOW).ok


def test_no_idle_flags_neither_live_nor_parked_sagas_but_still_flags_overdue_ones(
    engine: sagas.Sagas,
) -> None:
    write_broken_store(engine)
    write_saga(engine, "compensating-on-time", "COMPENSATING",
               ROLLED_BACK | {"hold_flight": ("COMPENSATING", ["RUNNING", "SUCCEEDED",
                                                               "COMPENSATING"])},
               stall_deadline=NOW + timedelta(seconds=10))
    write_saga(engine, "running-past-saga-deadline", "RUNNING",
               {"hold_flight": ("RUNNING", ["RUNNING"]), "hold_hotel": ("RUNNING", ["RUNNING"]),
                "charge": ("PENDING", [])},
               stall_deadline=NOW + timedelta(seconds=10), deadline_at=NOW - HOUR)
    write_saga(engine, "running-just-past-deadline", "RUNNING",
               {"hold_flight": ("RUNNING", ["RUNNING"]), "hold_hotel": ("RUNNING", ["RUNNING"]),
                "charge": ("PENDING", [])},
               stall_deadline=NOW - timedelta(seconds=60), deadline_at=NOW - timedelta(seconds=60))

    report = audit(engine, idle=False, now=NOW)

    assert reported(report) == (BROKEN - {("running-stalled-an-hour", STUCK), ("parked", PARKED)}
                                | {("running-past-saga-deadline", RULE_DEADLINE)})
    assert RULE_IDLE not in report.checks_run
    overdue = [f.detail for f in report.findings if f.saga_id == "running-past-saga-deadline"]
    assert len(overdue) == 1 and "saga deadline" in overdue[0]


def test_sagas_are_read_in_batches_without_losing_or_repeating_one(
    engine: sagas.Sagas, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit_mod, "BATCH", 2)
    for i in range(5):
        write_saga(engine, f"trip-{i}", "COMPLETED", DONE)
    write_saga(engine, "trip-9-failed", "COMPLETED",
               DONE | {"charge": ("FAILED", ["RUNNING", "FAILED"])})

    report = audit(engine, now=NOW)

    assert report.sagas == 6
    assert report.checks == 6 * 4
    assert reported(report) == {("trip-9-failed", RULE_COMPLETED)}


# --- domain checks --------------------------------------------------------------------------
def test_a_domain_checks_findings_follow_the_engines_and_count_as_one_check(
    engine: sagas.Sagas,
) -> None:
    write_broken_store(engine)
    seen: list[sagas.Sagas] = []

    def ledger(eng: sagas.Sagas) -> Iterator[Any]:
        seen.append(eng)
        yield Finding("ledger balanced", "2 units missing", "ok-completed")
        yield {"rule": "ledger balanced", "detail": "1 orphan row", "saga": None}

    def quiet(eng: sagas.Sagas) -> list[Finding]:
        return []

    engine_only = audit(engine, now=NOW)
    engine.add_audit_check(ledger)
    engine.add_audit_check(quiet)

    report = audit(engine, now=NOW)

    assert seen == [engine]
    assert report.findings[:-2] == engine_only.findings
    assert report.findings[-2:] == [
        Finding("ledger balanced", "2 units missing", "ok-completed"),
        Finding("ledger balanced", "1 orphan row", None),
    ]
    assert reported(report) == BROKEN | {("ok-completed", "ledger balanced"),
                                         (None, "ledger balanced")}
    assert report.checks_run == [*engine_only.checks_run, "ledger", "quiet"]
    assert report.checks == engine_only.checks + 2


def test_a_raising_domain_check_becomes_a_finding_naming_it_not_a_crash(
    engine: sagas.Sagas,
) -> None:
    write_saga(engine, "ok-completed", "COMPLETED", DONE)

    def broken_ledger(eng: sagas.Sagas) -> list[Finding]:
        raise RuntimeError("ledger table missing")

    def after(eng: sagas.Sagas) -> list[Finding]:
        return [Finding("after", "still ran")]

    engine.add_audit_check(broken_ledger)
    engine.add_audit_check(after)

    report = audit(engine, now=NOW)

    assert report.findings == [
        Finding("broken_ledger", "the check raised RuntimeError: ledger table missing"),
        Finding("after", "still ran"),
    ]
    assert report.summary() == (
        "audit: 1 saga (COMPLETED 1), 6 checks: 2 violations")


def test_a_domain_check_sees_whether_the_audit_treats_the_system_as_idle(
    engine: sagas.Sagas,
) -> None:
    flags: list[bool] = []
    engine.add_audit_check(lambda eng: flags.append(audit_idle()) or [])

    audit(engine, idle=True)
    audit(engine, idle=False)

    assert flags == [True, False]
    assert audit_idle() is True


def test_an_unreadable_store_raises_store_unavailable(tmp_path: Path) -> None:
    app = Celery("audit-test-down", broker="memory://")
    # The database "file" is a directory: SQLite cannot open it.
    eng = sagas.Sagas(app, sagas.SagaSettings(database_url=f"sqlite:///{tmp_path}",
                                              sagas_listeners=""))

    with pytest.raises(sagas.StoreUnavailableError):
        audit(eng)


# --- the order sample's ledger check as a plug-in ------------------------------------------
def test_the_order_ledger_check_plugs_in_and_follows_no_idle(
    engine: sagas.Sagas, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    from config.settings import get_app_settings
    from tasks.audit import order_ledger_check
    from tasks.db import get_engine
    from tasks.models import DomainBase

    # The participants' ledgers are in their own database: here, the same file as the store.
    monkeypatch.setenv("DATABASE_URL", engine.settings.database_url)
    get_app_settings.cache_clear()
    request.addfinalizer(get_app_settings.cache_clear)
    monkeypatch.setattr("tasks.db._engines", {})
    DomainBase.metadata.create_all(get_engine())
    write_saga(engine, "order-1", "COMPLETED",
               {"reserve_inventory": ("SUCCEEDED", ["RUNNING", "SUCCEEDED"])}, name="order")
    write_saga(engine, "order-2", "RUNNING",
               {"reserve_inventory": ("RUNNING", ["RUNNING"])}, name="order",
               stall_deadline=NOW + HOUR)
    check = engine.add_audit_check(order_ledger_check(starting_stock={}))

    idle = audit(engine, now=NOW)
    live = audit(engine, idle=False, now=NOW)

    assert getattr(check, "__name__", None) == "order_ledgers"
    assert idle.checks_run[-1] == live.checks_run[-1] == "order_ledgers"
    ledger_rules = {"completed: one reservation consumed", "completed: one charge, not refunded",
                    "completed: one shipment"}
    assert {(f.saga_id, f.rule) for f in live.findings} == {
        ("order-1", rule) for rule in ledger_rules}
    assert {(f.saga_id, f.rule) for f in idle.findings} == (
        {("order-1", rule) for rule in ledger_rules}
        | {("order-2", STUCK), ("order-2", "not terminal")})


# --- rows the real coordinator and store wrote ----------------------------------------------
def test_sagas_driven_by_the_real_coordinator_audit_clean(engine: sagas.Sagas) -> None:
    from sagas.coordinator import ACTION, COMPENSATION, StepFailed, StepSucceeded
    from sagas.runtime.transitions import apply_event

    binding = engine._binding

    def send(saga_id: str, *events: Any) -> None:
        for event in events:
            decision = apply_event(binding, saga_id, event)
            assert decision.ignored is None, decision.ignored

    completed = engine.start(TRIP, {}).id
    send(completed, StepSucceeded("hold_flight", ACTION), StepSucceeded("hold_hotel", ACTION),
         StepSucceeded("charge", ACTION))
    compensated = engine.start(TRIP, {}).id
    send(compensated, StepSucceeded("hold_flight", ACTION),
         StepFailed("hold_hotel", ACTION, "no rooms"), StepSucceeded("hold_flight", COMPENSATION))
    parked = engine.start(TRIP, {}).id
    send(parked, StepSucceeded("hold_flight", ACTION), StepFailed("hold_hotel", ACTION, "full"),
         StepFailed("hold_flight", COMPENSATION, "airline down"))
    running = engine.start(TRIP, {}).id
    send(running, StepSucceeded("hold_flight", ACTION))

    assert engine.states([completed, compensated, parked, running]) == {
        completed: "COMPLETED", compensated: "COMPENSATED", parked: "COMPENSATION_FAILED",
        running: "RUNNING"}
    live = audit(engine, idle=False)
    assert live.ok, live.findings
    assert live.sagas == 4
    idle = audit(engine)
    assert reported(idle) == {(parked, PARKED), (running, STUCK)}

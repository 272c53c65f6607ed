"""Stalled steps: when recovery looks again (deadlines, backoff), what the log replays into, why a
saga is shown stalled, and how the dashboard credits the delivery an outcome came from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sagas.coordinator import (
    ACTION,
    CancelRequested,
    Redrive,
    RetryRequested,
    SagaSnapshot,
    StepFailed,
    StepSnapshot,
)
from sagas.ops import dashboard
from sagas.runtime.stalls import StallReason, stall_of
from sagas.runtime.transitions import redrive_wait, step_due, step_span
from sagas.settings import SagaSettings
from sagas.states import SagaState, StepState
from sagas.store.log import LogEntry, replay
from tests.unit.harness import Run, make_saga, step

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SETTINGS = SagaSettings(step_timeout=300, recovery_grace=30, recovery_backoff_max=600)


# --- deadlines ----------------------------------------------------------------------------------
def test_a_step_with_a_time_limit_is_due_past_its_hard_limit_plus_the_grace():
    assert step_span(SETTINGS, step("a", time_limit=4)) == 4 + 5 + 30


def test_a_step_without_a_time_limit_waits_step_timeout():
    assert step_span(SETTINGS, step("a")) == 300


def test_looks_without_progress_double_the_wait_up_to_the_ceiling_never_below_the_span():
    assert [redrive_wait(39, k, 600) for k in range(6)] == [39, 78, 156, 312, 600, 600]
    assert redrive_wait(300, 3, 100) == 300, "never sooner than the step's own span"
    assert redrive_wait(2, 10_000, 8) == 8


def test_a_steps_due_time_counts_from_its_last_move_plus_its_countdown():
    saga = make_saga(step("a", time_limit=10))
    moved = StepSnapshot("a", StepState.RUNNING, attempts=1, since=T0, countdown=3)
    assert step_due(SETTINGS, saga, moved) == T0 + timedelta(seconds=3 + 10 + 5 + 30)
    moved.redrives = 2
    assert step_due(SETTINGS, saga, moved) == T0 + timedelta(seconds=3 + 4 * 45)


# --- the replay agrees with the decisions ---------------------------------------------------------
def _replayed(run: Run) -> SagaSnapshot:
    entries = [LogEntry(i, T0 + timedelta(seconds=i), "Redrive" if t.keeps_error else "X",
                        t.step, str(run.state), (t,), None)
               for i, t in enumerate(run.transitions)]
    snap = SagaSnapshot(run.snap.id, run.snap.name, run.state, {}, {})
    return replay(snap, entries, run.saga.order)


def _counters(snap: SagaSnapshot) -> dict[str, tuple[Any, ...]]:
    return {n: (s.state, s.attempts, s.compensation_attempts, s.redrives, s.held, s.failures,
                s.delivery) for n, s in snap.steps.items()}


def test_what_a_decision_counts_is_what_the_log_replays():
    run = Run(make_saga(step("a"), step("b", depends_on=[]), step("c", depends_on=["a"])))
    run.start()
    run.send(Redrive(queued=("a",)))
    run.send(Redrive(queued=("b",)))
    run.succeed("a")
    run.send(CancelRequested())
    run.send(StepFailed("b", ACTION, "ActionRevoked: never run", definite=False, attempt=1))
    assert _counters(_replayed(run)) == _counters(run.snap)


def test_an_operators_retry_of_a_parked_roll_forward_resets_the_budget_in_the_replay_too():
    run = Run(make_saga(step("a"), step("pay", pivot=True), step("z", comp=False,
                                                                 forward_retries=0)))
    run.start()
    run.succeed("a")
    run.succeed("pay")
    run.fail("z")
    assert run.state == SagaState.FORWARD_FAILED
    run.send(RetryRequested())
    entries = [LogEntry(i, T0, "RetryRequested" if t.from_state == "FAILED" and t.step == "z"
                        and t.to_state == "RUNNING" else "X", t.step, "RUNNING", (t,), None)
               for i, t in enumerate(run.transitions)]
    snap = replay(SagaSnapshot("saga-1", "unit", SagaState.RUNNING, {}, {}), entries,
                  run.saga.order)
    assert snap.steps["z"].failures == run.snap.steps["z"].failures == 0


# --- why a saga is shown stalled ----------------------------------------------------------------
def _snap(**steps: StepSnapshot) -> SagaSnapshot:
    return SagaSnapshot("s-1", "unit", SagaState.RUNNING, {}, dict(steps))


def test_a_step_within_its_deadline_is_not_stalled():
    saga = make_saga(step("a", time_limit=10))
    snap = _snap(a=StepSnapshot("a", StepState.RUNNING, attempts=1, since=T0))
    assert stall_of(SETTINGS, saga, snap, T0 + timedelta(seconds=44)) is None


def test_past_its_deadline_it_is_overdue_and_the_sentence_names_the_bound():
    saga = make_saga(step("a"))
    snap = _snap(a=StepSnapshot("a", StepState.RUNNING, attempts=1, since=T0))
    stall = stall_of(SETTINGS, saga, snap, T0 + timedelta(seconds=301))
    assert stall is not None and stall.reasons == [StallReason.OVERDUE]
    assert stall.reason(SETTINGS) == (
        "a made no progress since 12:00:00 UTC, past its deadline (no time_limit: "
        "STEP_TIMEOUT 300 s); recovery re-drives it at its next run")


def test_held_by_recovery_it_is_queued_until_it_moves_whatever_its_next_deadline():
    saga = make_saga(step("a", queue="payment"))
    held = StepSnapshot("a", StepState.RUNNING, attempts=1, since=T0 + timedelta(seconds=300),
                        redrives=1, held=True, stalled_since=T0)
    stall = stall_of(SETTINGS, saga, _snap(a=held), T0 + timedelta(seconds=301))
    assert stall is not None
    (only,) = stall.steps
    assert (only.reason, only.queue, only.looks, only.since) == (
        StallReason.QUEUED, "payment", 1, T0)
    assert only.next_look == T0 + timedelta(seconds=300 + 600)
    assert "has waited in queue 'payment' since 12:00:00 UTC: no worker has taken" in (
        only.sentence(SETTINGS))


def test_a_settled_saga_is_never_stalled():
    saga = make_saga(step("a"))
    snap = _snap(a=StepSnapshot("a", StepState.RUNNING, since=T0, redrives=3))
    snap.state = SagaState.FORWARD_FAILED
    assert stall_of(SETTINGS, saga, snap, T0 + timedelta(days=1)) is None


# --- the dashboard credits the delivery that ran --------------------------------------------------
def _event(step: str | None, src: str, dst: str, attempt: int, at: int,
           cause: str = "StepSucceeded", error: str | None = None) -> dict[str, Any]:
    return {"step": step, "from_state": src, "to_state": dst, "attempt": attempt,
            "error": error, "at": (T0 + timedelta(seconds=at)).isoformat(), "cause": cause}


def test_an_older_deliverys_success_is_its_own_and_the_newer_one_is_superseded():
    view = {"id": "s", "events": [
        _event("b", "PENDING", "RUNNING", 1, 0, "Started"),
        _event("b", "RUNNING", "RUNNING", 2, 5, "Redrive", "re-driven by recovery"),
        _event("b", "RUNNING", "RUNNING", 2, 15, "Redrive",
               "re-drive held: its message still waits in the broker"),
        _event("b", "RUNNING", "SUCCEEDED", 1, 20),
    ]}
    first, second = dashboard.timeline(view, "http://f")
    assert (first["attempt"], first["outcome"], first["task_id"]) == (1, "succeeded", "s.b.do.1")
    assert first["ended_at"] == (T0 + timedelta(seconds=20)).isoformat()
    assert (second["attempt"], second["outcome"], second["task_id"]) == (
        2, "superseded", "s.b.do.2")
    assert second["redrive"] and second["held"] == 1, "a hold starts no bar of its own"
    kinds = [m.kind for m in dashboard.markers(view)]
    assert kinds == ["redrive", "held"]


def test_a_celery_retry_keeps_its_task_and_the_failure_ends_the_last_try():
    view = {"id": "s", "events": [
        _event("a", "PENDING", "RUNNING", 1, 0, "Started"),
        _event("a", "RUNNING", "RUNNING", 2, 1, "StepRetrying", "TransientError: x"),
        _event("a", "RUNNING", "FAILED", 2, 2, "StepFailed", "TransientError: x"),
    ]}
    first, second = dashboard.timeline(view, "http://f")
    assert (first["outcome"], second["outcome"]) == ("retry", "failed")
    assert first["task_id"] == second["task_id"] == "s.a.do.1"

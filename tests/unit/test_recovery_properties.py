"""The coordinator under crashes and recovery, checked against an idempotent ledger.

tests/unit/test_coordinator_properties.py already checks the transition tables, single dispatch
and settling under reordered and duplicated callbacks. This adds what recovery changes: step
deliveries that are lost, duplicated or crash after their effect (so no callback ever comes),
failures that say nothing about the effect (``definite=False``: retries spent or a time limit
hit after the commit, a lost worker, an unreachable backend; the pivot is re-driven, any other
step compensated), a saga deadline, and the reconciler's ``Redrive`` at random moments.
Participants are modelled like the order domain's: one effect per
idempotency key, a compensation before its action leaves a tombstone, every compensation is a
no-op when nothing happened. Whatever happens, once the saga settles the ledger balances:
COMPLETED applied every effect exactly once, COMPENSATED left no effect that has a compensation
applied and never applied the pivot's (which has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    DeadlinePassed,
    Decision,
    Dispatch,
    IgnoreKind,
    Redrive,
    Started,
    StepFailed,
    StepSucceeded,
)
from sagas.states import SagaState, StepState
from tests.unit.harness import Run
from tests.unit.test_coordinator_properties import saga_graphs

APPLIED, UNDONE, TOMBSTONE = "applied", "undone", "tombstone"
CHAOS_BUDGET = 12  # then the system heals, so every run can settle
MAX_ROUNDS = 400


@dataclass
class Delivery:
    dispatch: Dispatch


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(saga=saga_graphs(), data=st.data())
def test_crashes_duplicates_and_redrives_never_unbalance_the_ledger(saga, data):
    run = Run(saga)
    # A business refusal is a property of the input: every delivery of that step refuses. Only
    # the pivot and the steps it waits for may refuse: a step that can still run once the pivot
    # passed is retried forward, and a refusal there would never end.
    may_refuse = (
        set(saga.order) if saga.pivot is None
        else {n for n in saga.order if saga.pivot in saga.descendants(n)} | {saga.pivot}
    )
    refuses = {n for n in saga.order
               if n in may_refuse and data.draw(st.integers(0, 4), label=f"{n} refuses") == 0}
    ledger: dict[str, str] = {}
    inbox: list[Any] = []
    chaos = CHAOS_BUDGET
    redrives = 0

    def absorb(decision: Decision) -> None:
        for d in decision.dispatches:
            inbox.append(Delivery(d))

    def deliver(d: Dispatch) -> None:
        """A participant runs once; what reaches the coordinator depends on the crash."""
        nonlocal chaos
        fate = "clean"
        if chaos > 0:
            fate = data.draw(st.sampled_from(
                ["clean", "clean", "lost before", "lost after", "indefinite", "duplicated"]
            ), label="fate")
            if fate != "clean":
                chaos -= 1
        if fate == "lost before":
            return  # the worker died before the effect: no callback, recovery must notice
        if d.phase == ACTION:
            if d.step in refuses:
                inbox.append(StepFailed(d.step, ACTION, "refused"))
                return
            ledger.setdefault(d.step, APPLIED)  # a tombstone or an undo stays what it is
        elif ledger.get(d.step) == APPLIED:
            ledger[d.step] = UNDONE
        else:
            ledger.setdefault(d.step, TOMBSTONE)
        if fate == "lost after":
            return  # effect committed, callback never sent
        if fate == "indefinite" and d.phase == ACTION:
            # The effect committed, then the step failed in a way that hides it.
            inbox.append(StepFailed(d.step, d.phase, "WorkerLostError", definite=False))
            return
        inbox.append(StepSucceeded(d.step, d.phase, {"by": d.step}))
        if fate == "duplicated":
            inbox.append(Delivery(d))  # at-least-once: the same message again

    absorb(run.send(Started()))
    deadline_at = data.draw(st.none() | st.integers(0, 30), label="saga deadline passes at")
    rounds = 0
    while run.state not in (SagaState.COMPLETED, SagaState.COMPENSATED,
                            SagaState.COMPENSATION_FAILED):
        rounds += 1
        assert rounds < MAX_ROUNDS, f"never settled: {run.states()} {ledger}"
        if rounds == deadline_at:
            absorb(run.send(DeadlinePassed()))
        early = chaos > 0 and data.draw(st.booleans(), label="reconciler runs early")
        if early:
            chaos -= 1  # an early re-drive is chaos too: it duplicates work in flight
        if inbox and not early:
            message = inbox.pop(data.draw(st.integers(0, len(inbox) - 1), label="next"))
            if isinstance(message, Delivery):
                deliver(message.dispatch)
            else:
                absorb(run.send(message))
        else:
            # Nothing in flight reaches anyone (or the reconciler ran early): recovery re-drives.
            redrives += 1
            absorb(run.send(Redrive()))
    # Late and duplicate messages still in the queues change nothing on the books that matters.
    while inbox:
        message = inbox.pop()
        if isinstance(message, Delivery):
            deliver(message.dispatch)
        else:
            decision = run.send(message)
            assert decision.ignored, message

    event(f"ends {run.state}")
    event(f"re-drives: {min(redrives, 3)}+")
    pivot = saga.pivot
    if run.state == SagaState.COMPLETED:
        assert set(run.states().values()) == {StepState.SUCCEEDED}
        assert all(ledger.get(n) == APPLIED for n in saga.order), ledger
    if run.state == SagaState.COMPENSATED:
        for name in saga.order:
            if saga.steps[name].compensation is not None:
                assert ledger.get(name) != APPLIED, (name, ledger, run.states())
        if pivot is not None and not pivot_in_flight_at_rollback(run, pivot):
            # (A pivot already running beside the step that failed may still succeed; it has
            # no compensation and is skipped: the definition's choice, not a lost effect.)
            assert ledger.get(pivot) is None, f"pivot {pivot} applied in a compensated saga"
    if run.state == SagaState.COMPENSATION_FAILED:
        raise AssertionError("compensations never refuse here; nothing may park")


def pivot_in_flight_at_rollback(run: Run, pivot: str) -> bool:
    state = StepState.PENDING
    for t in run.transitions:
        if t.step is None and t.to_state == SagaState.COMPENSATING:
            return state == StepState.RUNNING
        if t.step == pivot:
            state = StepState(t.to_state)
    return False


def test_an_indefinite_failure_of_the_pivot_leaves_it_running_for_recovery():
    from tests.unit.harness import make_saga, step

    saga = make_saga(step("a"), step("p", comp=False, pivot=True), step("z", comp=False))
    run = Run(saga)
    run.start()
    run.succeed("a")
    decision = run.send(StepFailed("p", ACTION, "WorkerLostError: lost", definite=False))
    assert decision.ignored is not None
    assert decision.ignored.kind is IgnoreKind.PIVOT_OUTCOME_UNKNOWN
    assert run.step_state("p") == StepState.RUNNING and run.state == SagaState.RUNNING
    redrive = run.send(Redrive())
    assert [(d.step, d.phase, d.attempt) for d in redrive.dispatches] == [("p", ACTION, 2)]
    run.send(StepFailed("p", ACTION, "PaymentDeclined: no", definite=True))
    assert run.state in (SagaState.COMPENSATING, SagaState.COMPENSATED)
    assert run.dispatched(COMPENSATION) == ["a"]


def test_a_deadline_while_the_pivot_is_in_flight_waits_for_its_outcome():
    from tests.unit.harness import make_saga, step

    saga = make_saga(step("a"), step("p", comp=False, pivot=True))
    run = Run(saga)
    run.start()
    run.succeed("a")
    ignored = run.send(DeadlinePassed()).ignored
    assert ignored is not None and ignored.kind is IgnoreKind.PIVOT_IN_FLIGHT
    assert run.state == SagaState.RUNNING
    run.succeed("p")
    assert run.state == SagaState.COMPLETED
    ignored = run.send(DeadlinePassed()).ignored
    assert ignored is not None and ignored.kind is IgnoreKind.SETTLED

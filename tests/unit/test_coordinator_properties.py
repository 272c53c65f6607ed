"""Random DAG sagas run with random outcomes, delivered out of order and duplicated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    CancelRequested,
    Decision,
    Started,
    StepFailed,
    StepRetrying,
    StepSucceeded,
    Transition,
)
from sagas.errors import SagaStateError
from sagas.states import (
    SAGA_SETTLED,
    SAGA_TRANSITIONS,
    STEP_ROLLED_BACK,
    STEP_TRANSITIONS,
    SagaState,
    StepState,
)
from tests.unit.harness import Run, make_saga, step

# Past this attempt every action succeeds, so forward retries after the pivot come to an end.
LAST_FAILING_ATTEMPT = 2


@st.composite
def saga_graphs(draw: st.DrawFn):
    n = draw(st.integers(3, 6))
    names = [f"s{i}" for i in range(n)]
    parents: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        earlier = names[:i]
        parents[name] = (
            draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        )
    pivot = draw(st.none() | st.sampled_from(names))
    after_pivot: set[str] = set()
    if pivot is not None:
        frontier = [pivot]
        while frontier:
            current = frontier.pop()
            for name, deps in parents.items():
                if current in deps and name not in after_pivot:
                    after_pivot.add(name)
                    frontier.append(name)
    steps = [
        step(
            name,
            comp=name not in after_pivot and draw(st.booleans()),
            depends_on=parents[name],
            pivot=name == pivot,
        )
        for name in names
    ]
    return make_saga(*steps, name="random")


@dataclass
class Model:
    """What the test believes the states are, replayed from the recorded transitions."""

    saga: SagaState = SagaState.PENDING
    steps: dict[str, StepState] = field(default_factory=dict)
    log: list[Transition] = field(default_factory=list)

    def apply(self, transitions: list[Transition]) -> None:
        for t in transitions:
            if t.step is None:
                assert t.from_state == self.saga, t
                assert t.to_state in SAGA_TRANSITIONS[self.saga], t
                self.saga = SagaState(t.to_state)
            else:
                current = self.steps[t.step]
                assert t.from_state == current, t
                assert t.to_state in STEP_TRANSITIONS[current], t
                self.steps[t.step] = StepState(t.to_state)
            self.log.append(t)

    def index_of(self, name: str, targets: set[StepState]) -> list[int]:
        return [i for i, t in enumerate(self.log) if t.step == name and t.to_state in targets]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(saga=saga_graphs(), data=st.data())
def test_random_runs_obey_the_tables_dispatch_once_and_settle(saga, data):
    run = Run(saga)
    model = Model(steps={n: StepState.PENDING for n in saga.order})
    dispatched: set[tuple[str, str, int]] = set()
    inbox: list[Any] = []
    pivot_passed_while_running = False
    cancel_at = data.draw(st.none() | st.integers(0, 12), label="cancel after n deliveries")

    def absorb(decision: Decision) -> None:
        nonlocal pivot_passed_while_running
        model.apply(decision.transitions)
        assert model.saga == run.state
        assert model.steps == run.states()
        if decision.ignored:
            assert decision.transitions == [] and decision.dispatches == []
        if (saga.pivot and run.state == SagaState.RUNNING
                and run.step_state(saga.pivot) == StepState.SUCCEEDED):
            pivot_passed_while_running = True
        for d in decision.dispatches:
            key = (d.step, d.phase, d.attempt)
            assert key not in dispatched, f"dispatched twice: {key}"
            dispatched.add(key)
            assert d.attempt == run.snap.steps[d.step].attempt_of(d.phase)
            if d.phase == ACTION:
                assert run.state == SagaState.RUNNING, d
                for parent in saga.parents[d.step]:
                    assert run.step_state(parent) == StepState.SUCCEEDED, (d, parent)
            else:
                assert saga.steps[d.step].compensation is not None
                for child in saga.children[d.step]:
                    assert run.step_state(child) in STEP_ROLLED_BACK, (d, child)
            events: list[Any] = []
            if d.phase == ACTION and data.draw(st.booleans(), label="worker retries in place"):
                events.append(StepRetrying(d.step, d.phase, d.attempt + 1, "flaky"))
            can_fail = d.phase == COMPENSATION or d.attempt <= LAST_FAILING_ATTEMPT
            if can_fail and data.draw(st.integers(0, 3), label="outcome") == 0:
                outcome: Any = StepFailed(d.step, d.phase, f"{d.step} {d.phase} failed")
            else:
                outcome = StepSucceeded(d.step, d.phase, {"by": d.step})
            events += [outcome] * (1 + data.draw(st.integers(0, 2), label="duplicates"))
            inbox.extend(events)

    absorb(run.send(Started()))
    delivered = 0
    while inbox:
        if delivered == cancel_at:
            was_cancellable = run.state in (SagaState.PENDING, SagaState.RUNNING)
            try:
                absorb(run.send(CancelRequested("random cancel")))
            except SagaStateError:
                assert not was_cancellable or pivot_passed_while_running
            else:
                assert run.state not in (SagaState.PENDING, SagaState.RUNNING)
        message = inbox.pop(data.draw(st.integers(0, len(inbox) - 1), label="next event"))
        settled_before = run.state in SAGA_SETTLED
        decision = run.send(message)
        if settled_before:
            assert decision.ignored, f"{message} changed a settled saga"
        absorb(decision)
        delivered += 1

    event(f"ends {run.state}")
    event(f"forward retry: {any(a > 1 for n, p, a in dispatched if p == ACTION)}")
    # Once no events remain the saga has settled, with nothing left in flight.
    assert run.state in SAGA_SETTLED
    assert not {StepState.RUNNING, StepState.COMPENSATING} & set(run.states().values())
    ever_succeeded = {t.step for t in model.log if t.to_state == StepState.SUCCEEDED}

    if run.state == SagaState.COMPLETED:
        assert set(run.states().values()) == {StepState.SUCCEEDED}
        assert not any(phase == COMPENSATION for _, phase, _ in dispatched)
    else:
        assert not pivot_passed_while_running, "a saga past its pivot can only complete"
        assert set(run.states().values()) <= STEP_ROLLED_BACK
        for name in ever_succeeded:
            expected = (
                {StepState.COMPENSATED, StepState.COMPENSATION_FAILED}
                if saga.steps[name].compensation is not None
                else {StepState.SKIPPED}
            )
            assert run.step_state(name) in expected, name

    if run.state == SagaState.COMPENSATED:
        for name in ever_succeeded:
            if saga.steps[name].compensation is not None:
                assert run.step_state(name) == StepState.COMPENSATED, name
        # Each compensation began only after every child's compensation had finished.
        for name in saga.order:
            for began in model.index_of(name, {StepState.COMPENSATING}):
                for child in saga.children[name]:
                    if model.index_of(child, {StepState.COMPENSATING}):
                        finished = model.index_of(child, {StepState.COMPENSATED})
                        assert finished and finished[0] < began, (name, child)

    if run.state == SagaState.COMPENSATION_FAILED:
        failed = [n for n, s in run.states().items() if s == StepState.COMPENSATION_FAILED]
        assert failed
        assert run.snap.error == f"compensation failed for: {', '.join(failed)}"

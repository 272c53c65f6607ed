"""An in-memory driver for ``coordinator.decide``: no Celery, no database."""

from __future__ import annotations

from typing import Any

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    Decision,
    Dispatch,
    Phase,
    SagaSnapshot,
    Started,
    StepFailed,
    StepSnapshot,
    StepSucceeded,
    Transition,
    decide,
)
from sagas.definition import RetryPolicy, Saga, Step
from sagas.states import SagaState, StepState

NO_JITTER = RetryPolicy(backoff=0.5, backoff_max=4.0, jitter=False)


def step(name: str, *, comp: bool = True, **kwargs: Any) -> Step:
    """A step running ``svc.<name>``, compensated by ``svc.undo_<name>`` unless ``comp=False``."""
    kwargs.setdefault("retry", NO_JITTER)
    return Step(name, f"svc.{name}", f"svc.undo_{name}" if comp else None, **kwargs)


def make_saga(*steps: Step, name: str = "unit") -> Saga:
    return Saga(name, list(steps))


def new_snapshot(saga: Saga, saga_id: str = "saga-1") -> SagaSnapshot:
    return SagaSnapshot(
        id=saga_id, name=saga.name, state=SagaState.PENDING, input={},
        steps={n: StepSnapshot(n) for n in saga.order},
    )


class Run:
    """One saga's snapshot plus everything ``decide`` recorded and dispatched for it."""

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        self.snap = new_snapshot(saga)
        self.transitions: list[Transition] = []
        self.dispatches: list[Dispatch] = []

    # -- driving --
    def send(self, event: Any) -> Decision:
        decision = decide(self.saga, self.snap, event)
        self.transitions.extend(decision.transitions)
        self.dispatches.extend(decision.dispatches)
        return decision

    def start(self) -> Decision:
        return self.send(Started())

    def succeed(self, name: str, phase: Phase = ACTION, result: Any = None) -> Decision:
        return self.send(StepSucceeded(name, phase, result))

    def fail(
        self, name: str, phase: Phase = ACTION, error: str = "boom", *, definite: bool = True
    ) -> Decision:
        return self.send(StepFailed(name, phase, error, definite=definite))

    def undo(self, name: str) -> Decision:
        return self.succeed(name, COMPENSATION)

    # -- reading --
    @property
    def state(self) -> SagaState:
        return self.snap.state

    def step_state(self, name: str) -> StepState:
        return self.snap.steps[name].state

    def states(self) -> dict[str, StepState]:
        return {n: s.state for n, s in self.snap.steps.items()}

    def saga_path(self) -> list[str]:
        return [t.to_state for t in self.transitions if t.step is None]

    def step_path(self, name: str) -> list[str]:
        return [t.to_state for t in self.transitions if t.step == name]

    def entered(self, target: StepState) -> list[str]:
        """Steps in the order they moved into ``target``."""
        return [t.step for t in self.transitions if t.step is not None and t.to_state == target]

    def dispatched(self, phase: Phase = ACTION) -> list[str]:
        return [d.step for d in self.dispatches if d.phase == phase]

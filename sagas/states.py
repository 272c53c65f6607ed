"""The saga and step state machines: every allowed transition is listed here and nowhere else."""

from __future__ import annotations

from enum import StrEnum

from sagas.errors import InvalidTransitionError


class SagaState(StrEnum):
    PENDING = "PENDING"
    WAITING = "WAITING"  # a semantic lock it needs is held: it starts when the key frees
    RUNNING = "RUNNING"
    COMPENSATING = "COMPENSATING"
    COMPLETED = "COMPLETED"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    FORWARD_FAILED = "FORWARD_FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in SAGA_TERMINAL


class StepState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    SKIPPED = "SKIPPED"


SAGA_TERMINAL = frozenset({SagaState.COMPLETED, SagaState.COMPENSATED})
"""COMPENSATION_FAILED and FORWARD_FAILED are parked, not terminal: an operator may retry."""

SAGA_PARKED = frozenset({SagaState.COMPENSATION_FAILED, SagaState.FORWARD_FAILED})
"""Parked: a rollback whose compensation failed for good, or a saga past its pivot whose step
failed for good (a business refusal, or its forward budget spent). ``sagas retry`` resumes."""

SAGA_SETTLED = SAGA_TERMINAL | SAGA_PARKED
"""States in which nothing runs until an operator acts."""

SAGA_TRANSITIONS: dict[SagaState, frozenset[SagaState]] = {
    SagaState.PENDING: frozenset(
        {SagaState.WAITING, SagaState.RUNNING, SagaState.COMPENSATING}
    ),
    # Its keys granted, it starts; cancelled or past its deadline, it rolls back (nothing ran).
    # WAITING -> WAITING: given one key, it waits for its next one.
    SagaState.WAITING: frozenset(
        {SagaState.WAITING, SagaState.RUNNING, SagaState.COMPENSATING}
    ),
    # RUNNING -> FORWARD_FAILED: past the pivot a step failed for good; the saga parks.
    SagaState.RUNNING: frozenset(
        {SagaState.COMPLETED, SagaState.COMPENSATING, SagaState.FORWARD_FAILED}
    ),
    SagaState.COMPENSATING: frozenset({SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED}),
    # An operator's retry resumes a parked rollback.
    SagaState.COMPENSATION_FAILED: frozenset({SagaState.COMPENSATING}),
    # ... and a parked roll-forward: its failed steps are sent again.
    SagaState.FORWARD_FAILED: frozenset({SagaState.RUNNING}),
    SagaState.COMPLETED: frozenset(),
    SagaState.COMPENSATED: frozenset(),
}

STEP_TRANSITIONS: dict[StepState, frozenset[StepState]] = {
    # PENDING -> SKIPPED: the saga rolled back before the step was ever dispatched.
    StepState.PENDING: frozenset({StepState.RUNNING, StepState.SKIPPED}),
    # RUNNING -> RUNNING: another attempt (retry, forward retry, or a re-drive by recovery).
    StepState.RUNNING: frozenset(
        {StepState.RUNNING, StepState.SUCCEEDED, StepState.FAILED}
    ),
    # SUCCEEDED -> SKIPPED: rollback reached a step that has no compensation.
    StepState.SUCCEEDED: frozenset({StepState.COMPENSATING, StepState.SKIPPED}),
    # FAILED -> RUNNING: after the pivot a failed step is retried forward (within its forward
    # budget; past it, or on a business refusal, it stays FAILED and the saga parks until an
    # operator's retry sends it again).
    # FAILED -> COMPENSATING: a failure that says nothing about the effect (retries spent,
    # time limit, lost worker) may hide a committed effect, so the step is undone too.
    StepState.FAILED: frozenset({StepState.RUNNING, StepState.COMPENSATING}),
    StepState.COMPENSATING: frozenset(
        {StepState.COMPENSATING, StepState.COMPENSATED, StepState.COMPENSATION_FAILED}
    ),
    StepState.COMPENSATION_FAILED: frozenset({StepState.COMPENSATING}),
    StepState.COMPENSATED: frozenset(),
    StepState.SKIPPED: frozenset(),
}

# Steps in these states need nothing more from the rollback.
STEP_ROLLED_BACK = frozenset(
    {
        StepState.PENDING,
        StepState.FAILED,
        StepState.COMPENSATED,
        StepState.COMPENSATION_FAILED,
        StepState.SKIPPED,
    }
)


def can_transition_saga(current: SagaState, target: SagaState) -> bool:
    return target in SAGA_TRANSITIONS[current]


def can_transition_step(current: StepState, target: StepState) -> bool:
    return target in STEP_TRANSITIONS[current]


def check_saga_transition(current: SagaState, target: SagaState) -> None:
    if not can_transition_saga(current, target):
        raise InvalidTransitionError(f"saga cannot go from {current} to {target}")


def check_step_transition(step: str, current: StepState, target: StepState) -> None:
    if not can_transition_step(current, target):
        raise InvalidTransitionError(f"step {step!r} cannot go from {current} to {target}")

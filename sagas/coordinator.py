"""What happens next in a saga, decided from a snapshot of its state.

``decide`` is pure: it takes the saga's definition, its current snapshot and one event, checks
every change against the transition table, and returns the transitions to record and the tasks to
publish. The store writes them in one transaction; only after the commit are tasks published.
Because the input is the durable state, a duplicate or late callback finds nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from sagas.definition import Saga, SuccessShape
from sagas.errors import SagaStateError
from sagas.states import (
    SAGA_PARKED,
    STEP_ROLLED_BACK,
    SagaState,
    StepState,
    check_saga_transition,
    check_step_transition,
)

Phase = Literal["action", "compensation"]
ACTION: Phase = "action"
COMPENSATION: Phase = "compensation"

COMPENSATION_STATES = frozenset(
    {StepState.COMPENSATING, StepState.COMPENSATED, StepState.COMPENSATION_FAILED}
)
"""A step in these states counts compensation attempts; in any other, action attempts."""


@dataclass
class StepSnapshot:
    name: str
    state: StepState = StepState.PENDING
    attempts: int = 0
    result: Any = None
    error: str | None = None
    compensation_attempts: int = 0
    since: datetime | None = None  # when the step last changed state (recovery's clock)
    countdown: float = 0.0  # the delay its current attempt was sent with
    # Recovery's notes (re-drives, and holds of a message still waiting in the broker) since
    # the step last made progress: its next re-drive backs off by this count.
    redrives: int = 0
    held: bool = False  # recovery's last note found its message still waiting in the broker
    stalled_since: datetime | None = None  # its last progress, while ``redrives`` > 0
    failures: int = 0  # FAILED moves since an operator last retried it (the forward budget)
    delivery: int = 0  # the attempt that began its current delivery (the task id's number)

    def attempt_of(self, phase: str) -> int:
        return self.compensation_attempts if phase == COMPENSATION else self.attempts


_IN_FLIGHT = frozenset({StepState.RUNNING, StepState.COMPENSATING})


def account(step: StepSnapshot, t: Transition, before: int, operator: bool = False) -> None:
    """The counters one transition of ``step`` moves; ``before``: the phase's attempt count
    before it. The same rules when a decision is taken and when the log is replayed.

    A recovery note (same state, ``keeps_error``) adds to ``redrives``: a re-drive when it
    numbers a new attempt, a hold when it does not; any other move is progress and clears them.
    A new attempt that is not a Celery retry of the same message begins a new delivery.
    """
    again = t.from_state == t.to_state
    if again and t.keeps_error:
        if step.redrives == 0:
            step.stalled_since = step.since
        step.redrives += 1
        step.held = t.attempt <= before
    else:
        step.redrives, step.held, step.stalled_since = 0, False, None
    target = StepState(t.to_state)
    if target is StepState.FAILED:
        step.failures += 1
    elif operator and t.from_state == StepState.FAILED:
        step.failures = 0  # an operator's retry grants a fresh forward budget
    if target in _IN_FLIGHT and t.attempt > before and not (again and not t.keeps_error):
        step.delivery = t.attempt


@dataclass
class SagaSnapshot:
    id: str
    name: str
    state: SagaState
    input: dict[str, Any]
    steps: dict[str, StepSnapshot]
    error: str | None = None
    version: int = 1  # the definition's version this instance runs on
    fingerprint: str | None = None

    def results(self) -> dict[str, Any]:
        return {n: s.result for n, s in self.steps.items() if s.result is not None}


@dataclass(frozen=True)
class Transition:
    step: str | None  # None: the saga itself
    from_state: str | None
    to_state: str
    attempt: int = 0
    error: str | None = None
    countdown: float = 0.0  # a dispatch's (or Celery retry's) delay before the attempt runs
    keeps_error: bool = False  # a bookkeeping note (a re-drive): the step keeps its error


@dataclass(frozen=True)
class Dispatch:
    step: str
    phase: Phase
    attempt: int
    countdown: float = 0.0


@dataclass(frozen=True)
class Revoke:
    """A step's action messages (attempts 1..``upto``) that must not start any more."""

    step: str
    upto: int


# --- events ---------------------------------------------------------------
@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class LockWaiting:
    """A start found one of its saga's semantic locks held: it waits for that key."""

    key: str
    holder: str


@dataclass(frozen=True)
class LockGranted:
    """A WAITING saga was given the last key it waited for: it starts."""

    key: str


@dataclass(frozen=True)
class StepSucceeded:
    step: str
    phase: Phase
    result: Any = None
    attempt: int | None = None  # the attempt that ran (history credits it); None: the current


@dataclass(frozen=True)
class StepFailed:
    step: str
    phase: Phase
    error: str
    # False when the failure says nothing about the effect (retries spent, time limit, worker
    # lost, broker or backend unreachable): the pivot, which has no compensation, is then
    # re-driven, never failed; any other step is compensated, in case its effect committed.
    definite: bool = True
    # The attempt the failed delivery was sent as (its task id's number); None: the current.
    attempt: int | None = None
    # After the pivot: the step refused for good (its retry policy's ``business`` errors);
    # the saga parks instead of sending it again.
    business: bool = False


@dataclass(frozen=True)
class StepRetrying:
    step: str
    phase: Phase
    attempt: int
    error: str
    countdown: float = 0.0  # Celery sends the next attempt after this many seconds


@dataclass(frozen=True)
class CancelRequested:
    reason: str = "cancelled by operator"


@dataclass(frozen=True)
class RetryRequested:
    """An operator resumes a parked saga (or re-drives a stalled one)."""


@dataclass(frozen=True)
class Redrive:
    """Recovery re-publishes work that made no progress; same idempotency keys.

    ``queued`` names steps whose current message recovery saw still waiting in the broker (no
    worker has taken it, or one took it just now), so sending another would only pile up a
    duplicate. They are held (a note in the history, the next look backed off), not
    re-published.
    """

    steps: tuple[str, ...] = ()
    queued: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeadlinePassed:
    """The saga's own deadline passed: unless it is at or past its pivot, it compensates."""

    reason: str = "saga deadline passed"


Event = (
    Started | LockWaiting | LockGranted | StepSucceeded | StepFailed | StepRetrying
    | CancelRequested | RetryRequested | Redrive | DeadlinePassed
)


class IgnoreKind(StrEnum):
    """Why an event changed nothing: callers branch on the kind, never on the text."""

    UNKNOWN_SAGA = "unknown_saga"
    UNKNOWN_STEP = "unknown_step"
    ALREADY_STARTED = "already_started"
    NOT_IN_FLIGHT = "not_in_flight"  # a late or duplicate callback: the step moved on
    ALREADY_RECORDED = "already_recorded"  # this retry attempt is recorded already
    PIVOT_OUTCOME_UNKNOWN = "pivot_outcome_unknown"
    ALREADY_COMPENSATING = "already_compensating"
    NOTHING_TO_REDRIVE = "nothing_to_redrive"
    SETTLED = "settled"
    PAST_PIVOT = "past_pivot"  # the saga can only go forward
    PIVOT_IN_FLIGHT = "pivot_in_flight"
    PRECONDITION = "precondition"  # the caller's own check under the row lock refused it
    NOT_DUE = "not_due"  # recovery: the saga made progress; its next look is later
    UNKNOWN_VERSION = "unknown_version"  # this process lacks the instance's definition version
    GRAPH_CHANGED = "graph_changed"  # same version, other steps: this process cannot decide


@dataclass(frozen=True)
class Ignored:
    """A typed reason an event was ignored, with a sentence for people."""

    kind: IgnoreKind
    detail: str

    def __str__(self) -> str:
        return self.detail


@dataclass
class Decision:
    transitions: list[Transition] = field(default_factory=list)
    dispatches: list[Dispatch] = field(default_factory=list)
    revokes: list[Revoke] = field(default_factory=list)  # after the commit, like dispatches
    changed_steps: set[str] = field(default_factory=set)
    saga_changed: bool = False
    ignored: Ignored | None = None

    @property
    def changed(self) -> bool:
        return bool(self.transitions)


class _Machine:
    """Applies transitions to a snapshot, refusing anything outside the table."""

    def __init__(self, saga: Saga, snap: SagaSnapshot) -> None:
        self.saga = saga
        self.snap = snap
        self.out = Decision()

    # -- primitive moves --
    def saga_to(self, target: SagaState, error: str | None = None) -> None:
        check_saga_transition(self.snap.state, target)
        self.out.transitions.append(Transition(None, self.snap.state, target, 0, error))
        self.snap.state = target
        if error:
            self.snap.error = error
        self.out.saga_changed = True

    def step_to(
        self,
        name: str,
        target: StepState,
        *,
        error: str | None = None,
        bump_attempt: bool = False,
        result: Any = None,
        keep_step_error: bool = False,
        ran: int | None = None,
        countdown: float = 0.0,
        operator: bool = False,
    ) -> StepSnapshot:
        """Move one step; ``ran`` credits the attempt that produced the outcome (history)."""
        step = self.snap.steps[name]
        check_step_transition(name, step.state, target)
        compensating = target in COMPENSATION_STATES
        before = step.compensation_attempts if compensating else step.attempts
        if bump_attempt:
            if compensating:
                step.compensation_attempts += 1
            else:
                step.attempts += 1
        attempt = step.compensation_attempts if compensating else step.attempts
        if ran is not None and 0 < ran <= attempt:
            attempt = ran
        transition = Transition(name, step.state, target, attempt, error, countdown,
                                keep_step_error)
        self.out.transitions.append(transition)
        account(step, transition, before, operator=operator)
        step.state = target
        step.countdown = countdown
        if error is not None and not keep_step_error:
            step.error = error
        if result is not None:
            step.result = result
        self.out.changed_steps.add(name)
        return step

    def dispatch(self, name: str, phase: Phase, countdown: float = 0.0) -> None:
        """Publish the step's current attempt (after the commit)."""
        self.out.dispatches.append(
            Dispatch(name, phase, self.snap.steps[name].attempt_of(phase), countdown)
        )

    # -- composite moves --
    def run_ready_steps(self) -> None:
        for name in self.saga.order:
            step = self.snap.steps[name]
            if step.state != StepState.PENDING:
                continue
            parents = self.saga.parents[name]
            if all(self.snap.steps[p].state == StepState.SUCCEEDED for p in parents):
                self.step_to(name, StepState.RUNNING, bump_attempt=True)
                self.dispatch(name, ACTION)
        if all(s.state == StepState.SUCCEEDED for s in self.snap.steps.values()):
            self.saga_to(SagaState.COMPLETED)

    def advance_rollback(self) -> None:
        """Compensate newest-first: a step is undone once everything after it is settled."""
        for name in reversed(self.saga.order):
            if self.snap.steps[name].state == StepState.PENDING:
                self.step_to(name, StepState.SKIPPED)
        progressed = True
        while progressed:
            progressed = False
            for name in reversed(self.saga.order):
                step = self.snap.steps[name]
                if step.state != StepState.SUCCEEDED:
                    continue
                children = self.saga.children[name]
                if not all(self.snap.steps[c].state in STEP_ROLLED_BACK for c in children):
                    continue
                if self.saga.steps[name].compensation is None:
                    self.step_to(name, StepState.SKIPPED)
                    progressed = True
                else:
                    self.step_to(name, StepState.COMPENSATING, bump_attempt=True)
                    self.dispatch(name, COMPENSATION)
        busy = any(s.state not in STEP_ROLLED_BACK for s in self.snap.steps.values())
        if busy or self.snap.state != SagaState.COMPENSATING:
            return
        failed = [
            n for n, s in self.snap.steps.items() if s.state == StepState.COMPENSATION_FAILED
        ]
        if failed:
            self.saga_to(
                SagaState.COMPENSATION_FAILED,
                error=f"compensation failed for: {', '.join(failed)}",
            )
        else:
            self.saga_to(SagaState.COMPENSATED)

    def pivot_passed(self) -> bool:
        pivot = self.saga.pivot
        return pivot is not None and self.snap.steps[pivot].state == StepState.SUCCEEDED

    def revoke_actions_in_flight(self) -> None:
        """The saga is called off: action messages not yet started must never start.

        The pivot is left alone: it has no compensation, so its outcome must be seen.
        """
        for name in self.saga.order:
            step = self.snap.steps[name]
            if step.state == StepState.RUNNING and name != self.saga.pivot and step.attempts:
                self.out.revokes.append(Revoke(name, step.attempts))

    def redrive(self, name: str, phase: Phase) -> None:
        """Send the step's work again (a new attempt, same key), keeping its error."""
        state = StepState.RUNNING if phase == ACTION else StepState.COMPENSATING
        self.step_to(name, state, bump_attempt=True, error=REDRIVEN, keep_step_error=True)
        self.dispatch(name, phase)

    def hold(self, name: str) -> None:
        """Its message still waits in the broker: a note, no new message."""
        step = self.snap.steps[name]
        self.step_to(name, step.state, error=HELD, keep_step_error=True)


REDRIVEN = "re-driven by recovery"
HELD = ("re-drive held: its message still waits in the broker (no worker has taken it, or one "
        "took it just now)")
UNDONE_UNHEARD = "no outcome from its action while the saga compensates: undone in case it ran"
"""The errors of recovery's notes in a step's history (the step keeps its own error)."""


def _credit(step: StepSnapshot, sent_as: int | None) -> int | None:
    """The attempt a delivery's outcome is credited to (``step_to``'s ``ran``).

    A failure names the attempt its delivery was sent as; while that delivery is the step's
    current one the current attempt is the try that ran (Celery's retries of one message
    number the attempts after it), else the older delivery's own number.
    """
    if sent_as is None or sent_as == step.delivery:
        return None
    return sent_as


def _not_running(step: str, state: StepState) -> Ignored:
    return Ignored(IgnoreKind.NOT_IN_FLIGHT, f"step {step!r} is {state}, not RUNNING")


def decide(saga: Saga, snap: SagaSnapshot, event: Event) -> Decision:
    """Mutates ``snap`` into the next state and says what to record and publish."""
    m = _Machine(saga, snap)
    handler = _HANDLERS[type(event)]
    reason = handler(m, event)
    if reason is not None:
        m.out.ignored = reason
    return m.out


def decide_success_alone(
    saga: Saga, snap: SagaSnapshot, step: str, attempt: int, result: Any
) -> Decision | None:
    """A step's success decided from the graph alone, or None when it needs the whole saga.

    ``snap`` holds what the step's own message carried (the input, its ancestors' results); it
    is completed here on the assumptions the store then enforces in the same statement: the saga
    is RUNNING and the step has not succeeded before. When either fails, the store records
    nothing and the caller decides with ``decide`` under the saga's lock instead.
    """
    shape = saga.success_shape.get(step)
    if shape is None or (shape is SuccessShape.COMPLETE and saga.locks is not None):
        return None  # (a saga with semantic locks releases them as it completes: the lock path)
    snap.state = SagaState.RUNNING
    snap.steps[step] = StepSnapshot(step, StepState.RUNNING, attempts=attempt)
    children = saga.children[step]
    for child in children:
        snap.steps[child] = StepSnapshot(child)
    m = _Machine(saga, snap)
    m.step_to(step, StepState.SUCCEEDED, result=result)
    if shape is SuccessShape.ADVANCE:
        for name in saga.order:
            if name in children:
                m.step_to(name, StepState.RUNNING, bump_attempt=True)
                m.dispatch(name, ACTION)
    else:
        m.saga_to(SagaState.COMPLETED)
    return m.out


def _on_started(m: _Machine, event: Started) -> Ignored | None:
    if m.snap.state != SagaState.PENDING:
        return Ignored(IgnoreKind.ALREADY_STARTED, f"saga already {m.snap.state}")
    m.saga_to(SagaState.RUNNING)
    m.run_ready_steps()
    return None


def _on_lock_granted(m: _Machine, event: LockGranted) -> Ignored | None:
    if m.snap.state != SagaState.WAITING:
        return Ignored(IgnoreKind.ALREADY_STARTED, f"saga already {m.snap.state}")
    m.saga_to(SagaState.RUNNING)
    m.run_ready_steps()
    return None


def _on_lock_waiting(m: _Machine, event: LockWaiting) -> Ignored | None:
    if m.snap.state not in (SagaState.PENDING, SagaState.WAITING):
        return Ignored(IgnoreKind.ALREADY_STARTED, f"saga already {m.snap.state}")
    # The reason rides on the transition (the history, `sagas show`), not as the saga's error.
    check_saga_transition(m.snap.state, SagaState.WAITING)
    m.out.transitions.append(Transition(
        None, m.snap.state, SagaState.WAITING, 0,
        f"waiting for key {event.key!r}, held by saga {event.holder}",
    ))
    m.snap.state = SagaState.WAITING
    m.out.saga_changed = True
    return None


def _on_succeeded(m: _Machine, event: StepSucceeded) -> Ignored | None:
    step = m.snap.steps.get(event.step)
    if step is None:
        return Ignored(IgnoreKind.UNKNOWN_STEP, f"unknown step {event.step!r}")
    if event.phase == ACTION:
        if step.state != StepState.RUNNING:
            return _not_running(event.step, step.state)
        m.step_to(event.step, StepState.SUCCEEDED, result=event.result, ran=event.attempt)
        if m.snap.state == SagaState.RUNNING:
            m.run_ready_steps()
        elif m.snap.state == SagaState.COMPENSATING:
            m.advance_rollback()
        return None
    if step.state != StepState.COMPENSATING:
        return Ignored(
            IgnoreKind.NOT_IN_FLIGHT, f"step {event.step!r} is {step.state}, not COMPENSATING"
        )
    m.step_to(event.step, StepState.COMPENSATED, ran=event.attempt)
    if m.snap.state == SagaState.COMPENSATING:
        m.advance_rollback()
    return None


def _on_failed(m: _Machine, event: StepFailed) -> Ignored | None:
    step = m.snap.steps.get(event.step)
    if step is None:
        return Ignored(IgnoreKind.UNKNOWN_STEP, f"unknown step {event.step!r}")
    if event.phase == COMPENSATION:
        if step.state != StepState.COMPENSATING:
            return Ignored(
            IgnoreKind.NOT_IN_FLIGHT, f"step {event.step!r} is {step.state}, not COMPENSATING"
        )
        m.step_to(
            event.step, StepState.COMPENSATION_FAILED, error=event.error,
            ran=_credit(step, event.attempt),
        )
        if m.snap.state == SagaState.COMPENSATING:
            m.advance_rollback()
        return None
    if step.state != StepState.RUNNING:
        return _not_running(event.step, step.state)
    if not event.definite and event.step == m.saga.pivot:
        return Ignored(
            IgnoreKind.PIVOT_OUTCOME_UNKNOWN,
            f"pivot step {event.step!r} outcome unknown ({event.error}); recovery re-drives it",
        )
    ran = _credit(step, event.attempt)
    if m.snap.state == SagaState.RUNNING and m.pivot_passed():
        # Past the point of no return: the saga can only go forward, within the step's budget.
        m.step_to(event.step, StepState.FAILED, error=event.error, ran=ran)
        spec = m.saga.steps[event.step]
        if event.business or step.failures > spec.forward_retries:
            why = ("refused for good" if event.business else
                   f"failed {step.failures} times (forward_retries={spec.forward_retries})")
            m.saga_to(
                SagaState.FORWARD_FAILED,
                error=f"step {event.step!r} {why} after the pivot: {event.error}",
            )
            return None
        countdown = spec.retry.delay(step.attempts + 1)
        m.step_to(event.step, StepState.RUNNING, bump_attempt=True, countdown=countdown)
        m.dispatch(event.step, ACTION, countdown=countdown)
        return None
    m.step_to(event.step, StepState.FAILED, error=event.error, ran=ran)
    if m.snap.state == SagaState.RUNNING:
        m.saga_to(SagaState.COMPENSATING, error=f"step {event.step!r} failed: {event.error}")
    if m.snap.state == SagaState.COMPENSATING:
        if not event.definite and m.saga.steps[event.step].compensation is not None:
            # Nothing after it ever ran (it never succeeded), so it is undone first.
            m.step_to(event.step, StepState.COMPENSATING, bump_attempt=True)
            m.dispatch(event.step, COMPENSATION)
        m.advance_rollback()
    return None


def _on_retrying(m: _Machine, event: StepRetrying) -> Ignored | None:
    step = m.snap.steps.get(event.step)
    if step is None:
        return Ignored(IgnoreKind.UNKNOWN_STEP, f"unknown step {event.step!r}")
    expected = StepState.RUNNING if event.phase == ACTION else StepState.COMPENSATING
    if step.state != expected:
        return Ignored(
            IgnoreKind.NOT_IN_FLIGHT, f"step {event.step!r} is {step.state}, not {expected}"
        )
    if step.attempt_of(event.phase) >= event.attempt:
        return Ignored(
            IgnoreKind.ALREADY_RECORDED,
            f"attempt {event.attempt} of {event.step!r} already recorded",
        )
    if event.phase == COMPENSATION:
        step.compensation_attempts = event.attempt - 1
    else:
        step.attempts = event.attempt - 1
    m.step_to(
        event.step, expected, error=event.error, bump_attempt=True, countdown=event.countdown
    )
    return None


def _on_cancel(m: _Machine, event: CancelRequested) -> Ignored | None:
    if m.snap.state == SagaState.COMPENSATING:
        return Ignored(IgnoreKind.ALREADY_COMPENSATING, "saga is already compensating")
    if m.snap.state == SagaState.FORWARD_FAILED:
        raise SagaStateError(
            f"saga {m.snap.id} is FORWARD_FAILED: it passed its pivot step {m.saga.pivot!r} and "
            "can only go forward; fix the cause, then retry it"
        )
    if m.snap.state not in (SagaState.PENDING, SagaState.WAITING, SagaState.RUNNING):
        raise SagaStateError(f"saga {m.snap.id} is {m.snap.state}; only a running saga cancels")
    if m.pivot_passed():
        raise SagaStateError(
            f"saga {m.snap.id} passed its pivot step {m.saga.pivot!r}; it can only go forward"
        )
    m.revoke_actions_in_flight()
    m.saga_to(SagaState.COMPENSATING, error=event.reason)
    m.advance_rollback()
    return None


def _on_retry(m: _Machine, event: RetryRequested) -> Ignored | None:
    if m.snap.state == SagaState.COMPENSATION_FAILED:
        m.saga_to(SagaState.COMPENSATING)
        for name in reversed(m.saga.order):
            if m.snap.steps[name].state == StepState.COMPENSATION_FAILED:
                m.step_to(name, StepState.COMPENSATING, bump_attempt=True)
                m.dispatch(name, COMPENSATION)
        m.advance_rollback()
        return None
    if m.snap.state == SagaState.FORWARD_FAILED:
        # The parked roll-forward: its failed steps are sent again with a fresh budget, and a
        # branch still in flight when it parked is sent again too (its message may be lost).
        m.saga_to(SagaState.RUNNING)
        for name in m.saga.order:
            step = m.snap.steps[name]
            if step.state == StepState.FAILED:
                m.step_to(name, StepState.RUNNING, bump_attempt=True, operator=True)
                m.dispatch(name, ACTION)
            elif step.state == StepState.RUNNING:
                m.redrive(name, ACTION)
        m.run_ready_steps()
        return None
    if m.snap.state in (SagaState.RUNNING, SagaState.COMPENSATING, SagaState.PENDING):
        return _on_redrive(m, Redrive())
    if m.snap.state == SagaState.WAITING:
        raise SagaStateError(
            f"saga {m.snap.id} is WAITING for a semantic lock; it starts when the key frees "
            "(`sagas locks` shows who holds it)"
        )
    raise SagaStateError(f"saga {m.snap.id} is {m.snap.state}; there is nothing to retry")


def _on_redrive(m: _Machine, event: Redrive) -> Ignored | None:
    if m.snap.state == SagaState.PENDING:
        return _on_started(m, Started())
    if m.snap.state == SagaState.WAITING:
        return Ignored(IgnoreKind.NOTHING_TO_REDRIVE, "waiting for a semantic lock")
    if m.snap.state in SAGA_PARKED:
        return Ignored(IgnoreKind.SETTLED, f"saga is {m.snap.state}: an operator retries it")
    wanted = set(event.steps) or set(m.snap.steps)
    queued = set(event.queued)
    compensating = m.snap.state == SagaState.COMPENSATING
    for name in m.saga.order:
        step = m.snap.steps[name]
        if name not in wanted or step.state not in _IN_FLIGHT:
            continue
        action = step.state == StepState.RUNNING
        if action and compensating and name != m.saga.pivot:
            # An action the rollback waits for made no progress: it is not sent forward again
            # (the saga was called off); it is undone, in case a delivery of it ran.
            m.step_to(name, StepState.FAILED, error=UNDONE_UNHEARD)
            if m.saga.steps[name].compensation is not None:
                m.step_to(name, StepState.COMPENSATING, bump_attempt=True)
                m.dispatch(name, COMPENSATION)
        elif name in queued:
            m.hold(name)
        else:
            m.redrive(name, ACTION if action else COMPENSATION)
    if m.snap.state == SagaState.RUNNING:
        m.run_ready_steps()
    elif m.snap.state == SagaState.COMPENSATING:
        m.advance_rollback()
    if not m.out.transitions:
        return Ignored(IgnoreKind.NOTHING_TO_REDRIVE, "nothing to re-drive")
    return None


def _on_deadline(m: _Machine, event: DeadlinePassed) -> Ignored | None:
    if m.snap.state not in (SagaState.PENDING, SagaState.WAITING, SagaState.RUNNING):
        return Ignored(IgnoreKind.SETTLED, f"saga already {m.snap.state}")
    if m.pivot_passed():
        return Ignored(
            IgnoreKind.PAST_PIVOT,
            f"saga passed its pivot step {m.saga.pivot!r}; it can only go forward",
        )
    pivot = m.saga.pivot
    if pivot is not None and m.snap.steps[pivot].state == StepState.RUNNING:
        # The pivot's effect may already exist; compensating now could strand it.
        return Ignored(
            IgnoreKind.PIVOT_IN_FLIGHT, f"pivot step {pivot!r} is in flight; its outcome decides"
        )
    m.revoke_actions_in_flight()
    m.saga_to(SagaState.COMPENSATING, error=event.reason)
    m.advance_rollback()
    return None


_HANDLERS: dict[type, Callable[[_Machine, Any], Ignored | None]] = {
    Started: _on_started,
    LockWaiting: _on_lock_waiting,
    LockGranted: _on_lock_granted,
    StepSucceeded: _on_succeeded,
    StepFailed: _on_failed,
    StepRetrying: _on_retrying,
    CancelRequested: _on_cancel,
    RetryRequested: _on_retry,
    Redrive: _on_redrive,
    DeadlinePassed: _on_deadline,
}

"""The saga log: one row per committed decision, and the replay that turns rows into state.

A decision of the coordinator (``Decision``) is recorded as one row of ``saga_log``: the
transitions it made (the saga's and its steps'), the result of the step it was about, and the
saga's state after it. A step's state is never stored anywhere else: it is the replay of the
saga's rows in sequence. The rows are also the outbox: the relay reads them by sequence
(``sagas.store.events`` says which transitions are lifecycle events).

Encoding a transition as a short JSON list (``[step, from, to, attempt]`` plus the error, the
countdown and the keeps-error flag when they are set) keeps a row small: a happy three-step saga
writes four log rows of about 100 bytes of transitions each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sagas.coordinator import (
    COMPENSATION_STATES,
    Decision,
    RetryRequested,
    SagaSnapshot,
    StepSnapshot,
    Transition,
    account,
)
from sagas.states import SagaState, StepState, can_transition_step

OPERATOR_RETRY = RetryRequested.__name__
"""The cause of an operator's retry (it grants a parked step a fresh forward budget)."""
GRAPH_CAUSES = frozenset({"Started", "Recorded", "Migrated"})
"""Causes of a saga's first log row, which names the instance's steps in its ``result``."""

_ACTION_COUNTED = frozenset({StepState.RUNNING, StepState.SUCCEEDED, StepState.FAILED})


def encode_transition(t: Transition) -> list[Any]:
    """``[step, from, to, attempt]``, then error, countdown, keeps_error only when set."""
    out: list[Any] = [t.step, t.from_state and str(t.from_state), str(t.to_state), t.attempt]
    tail: list[Any] = [t.error, t.countdown or 0, 1 if t.keeps_error else 0]
    while tail and not tail[-1]:
        tail.pop()
    return out + tail


def decode_transition(raw: Sequence[Any]) -> Transition:
    step, from_state, to_state, attempt = raw[:4]
    error = raw[4] if len(raw) > 4 else None
    countdown = float(raw[5]) if len(raw) > 5 else 0.0
    keeps = bool(raw[6]) if len(raw) > 6 else False
    return Transition(step, from_state, to_state, int(attempt), error or None, countdown, keeps)


def encode_decision(decision: Decision) -> list[list[Any]]:
    return [encode_transition(t) for t in decision.transitions]


def dedupe_key(cause: str, decision: Decision, subject: str | None) -> str | None:
    """A key the database refuses twice for the decisions that may happen once per saga.

    The start, a step's success and a compensation's success can each be recorded once; a
    second copy (a duplicate delivery racing the first) is refused by the unique index on
    ``(saga_id, dedupe)`` without anyone reading first. Other decisions are taken under the
    saga's lock from its current state and need no key.
    """
    if cause == "Started":
        return "started"
    for t in decision.transitions:
        if t.step == subject and t.to_state in (StepState.SUCCEEDED, StepState.COMPENSATED):
            return f"{subject}:{t.to_state}"
    return None


@dataclass(frozen=True)
class LogEntry:
    """One row of the log as read back."""

    seq: int
    at: datetime
    cause: str
    step: str | None
    saga_state: str
    transitions: tuple[Transition, ...]
    result: Any


def entry_of(row: Sequence[Any]) -> LogEntry:
    """A row of (seq, at, cause, step, saga_state, transitions, result)."""
    seq, at, cause, step, saga_state, transitions, result = row[:7]
    return LogEntry(
        int(seq), _aware(at), cause, step, saga_state,
        tuple(decode_transition(t) for t in transitions or ()), result,
    )


def replay(
    snap: SagaSnapshot, entries: Iterable[LogEntry], order: Sequence[str] = ()
) -> SagaSnapshot:
    """Fill ``snap.steps`` from the log, in sequence (the saga row gives the saga's state).

    The instance's steps are those its start row names (the graph it was started with), all
    PENDING at first; a log without one (carried over from an older store) takes ``order``,
    the registered definition's, and adds any other step the log names as it comes.
    """
    steps = snap.steps
    entries = list(entries)
    named = _named_steps(entries)
    for name in named if named is not None else order:
        steps.setdefault(name, StepSnapshot(name))
    for entry in entries:
        for t in entry.transitions:
            if t.step is None:
                continue
            step = steps.get(t.step)
            if step is None:
                step = steps[t.step] = StepSnapshot(t.step)
            apply_transition(step, t, entry)
    return snap


def _named_steps(entries: Sequence[LogEntry]) -> list[str] | None:
    for entry in entries[:1]:
        if entry.cause in GRAPH_CAUSES and isinstance(entry.result, dict):
            steps = entry.result.get("steps")
            if isinstance(steps, list):
                return [str(s) for s in steps]
    return None


def apply_transition(step: StepSnapshot, t: Transition, entry: LogEntry) -> None:
    target = StepState(t.to_state)
    before = step.compensation_attempts if target in COMPENSATION_STATES else step.attempts
    account(step, t, before, operator=entry.cause == OPERATOR_RETRY)
    step.state = target
    if target in COMPENSATION_STATES:
        step.compensation_attempts = max(step.compensation_attempts, t.attempt)
    elif target in _ACTION_COUNTED:
        step.attempts = max(step.attempts, t.attempt)
    if t.error is not None and not t.keeps_error:
        step.error = t.error
    if target is StepState.SUCCEEDED and entry.step == t.step and entry.step is not None:
        step.result = entry.result
    step.since = entry.at
    step.countdown = t.countdown


@dataclass
class StepTimes:
    """When a step's action and its compensation were first sent and last settled."""

    started_at: datetime | None = None
    finished_at: datetime | None = None
    compensation_started_at: datetime | None = None
    compensation_finished_at: datetime | None = None

    def as_dict(self) -> dict[str, datetime | None]:
        return {
            "started_at": self.started_at, "finished_at": self.finished_at,
            "compensation_started_at": self.compensation_started_at,
            "compensation_finished_at": self.compensation_finished_at,
        }


_ACTION_DONE = frozenset({StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED})
_COMPENSATION_DONE = frozenset({StepState.COMPENSATED, StepState.COMPENSATION_FAILED})


def step_times(entries: Iterable[LogEntry]) -> dict[str, StepTimes]:
    """Action and compensation times apart: a compensation never moves the action's start."""
    times: dict[str, StepTimes] = {}
    for entry in entries:
        for t in entry.transitions:
            if t.step is None:
                continue
            found = times.setdefault(t.step, StepTimes())
            target = StepState(t.to_state)
            if target is StepState.RUNNING and found.started_at is None:
                found.started_at = entry.at
            elif target in _ACTION_DONE and target is not StepState.SKIPPED:
                found.finished_at = entry.at
            elif target is StepState.COMPENSATING and found.compensation_started_at is None:
                found.compensation_started_at = entry.at
            elif target in _COMPENSATION_DONE:
                found.compensation_finished_at = entry.at
    return times


def replay_problems(entries: Iterable[LogEntry]) -> list[str]:
    """Transitions the table does not allow from the state the replay reached (the audit)."""
    states: dict[str, StepState] = {}
    problems = []
    for entry in entries:
        for t in entry.transitions:
            if t.step is None:
                continue
            current = states.get(t.step, StepState.PENDING)
            target = StepState(t.to_state)
            if not can_transition_step(current, target):
                problems.append(
                    f"step {t.step!r}: {current} -> {target} (log row {entry.seq}, "
                    f"{entry.cause}) is not an allowed transition"
                )
            states[t.step] = target
    return problems


def saga_from_row(
    saga_id: str, name: str, state: str, saga_input: Any, error: str | None,
    version: int | None, fingerprint: str | None,
) -> SagaSnapshot:
    return SagaSnapshot(
        id=saga_id, name=name, state=SagaState(state), input=saga_input, steps={},
        error=error, version=int(version or 1), fingerprint=fingerprint,
    )


def _aware(value: Any) -> datetime:
    """SQLite hands back naive datetimes (or text); everything the store writes is UTC."""
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    aware: datetime = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return aware

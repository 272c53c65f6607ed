"""Recovery: re-drive, from SQL, sagas whose work in flight made no progress past its deadline.

Celery's callbacks are not atomic with the step that sends them: a worker can die after a step's
effect committed but before its callback went out, a transition can commit and its publish be
lost, and a Redis without persistence forgets every queued message when it restarts. None of that
loses a saga, because every transition also set the saga's ``stall_deadline`` (now plus the time
limit of what is in flight). The reconciler here looks only at sagas past that deadline (an
indexed range scan, off the hot path) and re-publishes their in-flight steps with the same
idempotency keys, so a participant that already applied the effect only reports it again.

A step whose message still waits in the broker (no worker has taken it: its pool is down or
busy) is not re-published: recovery asks the broker first (``sagas.runtime.waiting``) and only
notes the hold. Each re-drive or hold of a step that brings no progress doubles the wait before
the next look (up to ``recovery_backoff_max``), so an outage of one pool leaves one message per
stalled step in its queue, not one more per run.

Several reconcilers may run at once (beat on one machine, ``sagas recover`` on another): each
re-drive is decided under the saga's row lock after re-checking the deadline, and a re-drive sets
a fresh deadline, so the losers of a race find nothing stale and dispatch nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    DeadlinePassed,
    Event,
    Ignored,
    IgnoreKind,
    Redrive,
    SagaSnapshot,
)
from sagas.errors import OutageKind, StoreUnavailableError, outage_of
from sagas.runtime import waiting
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import RECOVER_TASK
from sagas.runtime.message import step_task_id
from sagas.runtime.transitions import apply_event, stall_deadline, step_span
from sagas.settings import SagaSettings
from sagas.states import SagaState, StepState
from sagas.store.sql import sagas_t, utcnow

log = logging.getLogger("sagas.recovery")

LIVE_STATES = (SagaState.PENDING, SagaState.RUNNING, SagaState.COMPENSATING)
"""States with work that can stall (a WAITING saga waits for a key, not for a step)."""
# Only a saga that has not passed its pivot can still be turned back by its deadline.
DEADLINE_STATES = (SagaState.PENDING, SagaState.WAITING, SagaState.RUNNING)


BEAT_ENTRY = "sagas-recover-stalled"


def beat_entry(settings: SagaSettings) -> dict[str, Any]:
    """The Celery beat entry (``celery -A yourapp beat``): one reconciler run per interval.

    ``expires`` drops runs that waited longer than one interval in a backlog: the next tick
    does the same work, so stale ones would only pile up.
    """
    interval = settings.recovery_interval
    return {
        "task": RECOVER_TASK,
        "schedule": interval,
        "options": {"queue": settings.saga_queue, "expires": max(interval, 1.0)},
    }


@dataclass
class RecoveryReport:
    """What one reconciler run found and did."""

    stalled: int = 0  # past their deadline with work in flight that made no progress
    rescheduled: int = 0  # past the saga row's deadline, but busy: looked at again later
    redriven: list[str] = field(default_factory=list)
    # stalled, but every stalled step's message still waits in the broker: not sent again
    held: list[str] = field(default_factory=list)
    deadline_compensated: list[str] = field(default_factory=list)
    skipped: int = 0  # fresh again under the lock (another reconciler won) or nothing to do
    errors: list[str] = field(default_factory=list)
    max_overdue_s: float = 0.0  # how long past its stall deadline the most overdue saga was
    duration_s: float = 0.0
    dry_run: bool = False

    def summary(self) -> str:
        verb = "would re-drive" if self.dry_run else "re-drove"
        return (
            f"recovery: {self.stalled} stalled, {verb} {len(self.redriven)}, "
            f"{len(self.deadline_compensated)} past their deadline compensating, "
            f"{self.skipped} skipped, {len(self.errors)} errors, "
            f"{len(self.held)} held (their messages still wait in the broker), "
            f"{self.rescheduled} busy (looked at later); "
            f"most overdue {self.max_overdue_s:.1f}s; took {self.duration_s:.2f}s"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def stalled_sagas(conn: Connection, now: datetime, limit: int) -> list[tuple[str, datetime]]:
    """Live sagas past their stall deadline, oldest first (index ix_saga_instances_state_stall)."""
    rows = conn.execute(
        select(sagas_t.c.id, sagas_t.c.stall_deadline)
        .where(sagas_t.c.state.in_([str(s) for s in LIVE_STATES]),
               sagas_t.c.stall_deadline < now)
        .order_by(sagas_t.c.stall_deadline)
        .limit(limit)
    ).all()
    return [(str(r.id), _aware(r.stall_deadline)) for r in rows]


def overdue_sagas(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Sagas not yet settled whose own optional deadline has passed."""
    rows = conn.execute(
        select(sagas_t.c.id)
        .where(sagas_t.c.state.in_([str(s) for s in DEADLINE_STATES]),
               sagas_t.c.deadline_at < now)
        .order_by(sagas_t.c.deadline_at)
        .limit(limit)
    ).all()
    return [str(r.id) for r in rows]


Precondition = Callable[[Connection, SagaSnapshot], Ignored | None]


def _still_stalled(binding: Binding, now: datetime, report: RecoveryReport) -> Precondition:
    """Re-drive only what is really overdue, read from the log under the saga's lock.

    The saga row's deadline is written with the saga's own state changes, not by every step
    (a step's success writes one log row and nothing else), so a saga past it may have moved on:
    its real deadline is worked out from the steps in flight, and when it lies ahead the row is
    moved there and nothing is re-driven.
    """

    def check(conn: Connection, snap: SagaSnapshot) -> Ignored | None:
        if snap.state is SagaState.PENDING:
            return None  # recorded to start by now (a delayed start whose message was lost)
        due = stall_deadline(binding.settings, binding.find(snap.name, snap.version), snap)
        if due is None:
            return Ignored(IgnoreKind.PRECONDITION, "no work in flight any more")
        if due >= now:
            binding.store.move_deadline(conn, snap.id, due)
            return Ignored(IgnoreKind.NOT_DUE, f"made progress; due again at {due.isoformat()}")
        report.max_overdue_s = max(report.max_overdue_s, (now - due).total_seconds())
        return None

    return check


def _still_overdue(saga_id: str, now: datetime) -> Precondition:
    def check(conn: Connection, snap: SagaSnapshot) -> Ignored | None:
        row = conn.execute(select(sagas_t.c.deadline_at).where(sagas_t.c.id == saga_id)).first()
        if row is None or row.deadline_at is None or _aware(row.deadline_at) >= now:
            return Ignored(IgnoreKind.PRECONDITION, "deadline no longer passed")
        return None

    return check


def _really_stalled(
    binding: Binding, candidates: list[str], now: datetime
) -> dict[str, SagaSnapshot]:
    """Of sagas past their row's deadline, those whose work in flight is really overdue."""
    found = {}
    for saga_id, snap in binding.store.read_outcomes(candidates).items():
        due = stall_deadline(binding.settings, binding.find(snap.name, snap.version), snap)
        if snap.state is SagaState.PENDING or (due is not None and due < now):
            found[saga_id] = snap
    return found


_IN_FLIGHT = {StepState.RUNNING: ACTION, StepState.COMPENSATING: COMPENSATION}


def queued_steps(binding: Binding, snaps: dict[str, SagaSnapshot]) -> dict[str, tuple[str, ...]]:
    """Per saga, its steps in flight whose message still waits in the broker, or that a worker
    took less than the step's span ago (one look per queue): re-publishing them would only add
    a duplicate behind the message already there, or beside the delivery just begun."""
    wanted: dict[str, list[tuple[str, str, list[str], float]]] = {}
    now = time.time()
    for saga_id, snap in snaps.items():
        definition = binding.find(snap.name, snap.version)
        for step in snap.steps.values():
            phase = _IN_FLIGHT.get(step.state)
            spec = definition.steps.get(step.name) if definition is not None else None
            if phase is None or spec is None:
                continue
            ids = [step_task_id(saga_id, step.name, phase, n)
                   for n in range(1, step.attempt_of(phase) + 1)]
            since = now - step_span(binding.settings, spec)
            wanted.setdefault(saga_id, []).append((step.name, spec.target_queue, ids, since))
    if not wanted:
        return {}
    items = [item for found in wanted.values() for item in found]
    looks = waiting.look(binding, [q for _, q, _, _ in items],
                         taken_since=min(since for *_, since in items))
    out = {}
    for saga_id, found in wanted.items():
        held = tuple(
            name for name, queue, ids, since in found
            if (queue in looks.queues and looks.queues[queue].holds_any(ids))
            or looks.taken_since(ids, since)
        )
        if held:
            out[saga_id] = held
    return out


def _forget_deadline(binding: Binding, saga_id: str) -> None:
    """A saga past its pivot goes forward: stop looking at its deadline on every run."""
    with binding.store.begin() as conn:
        conn.execute(update(sagas_t).where(sagas_t.c.id == saga_id).values(deadline_at=None))


def recover_stalled(
    binding: Binding,
    now: datetime | None = None, limit: int | None = None, *, dry_run: bool = False
) -> RecoveryReport:
    """One reconciler pass: compensate sagas past their deadline, re-drive stalled ones.

    Safe to run anywhere and concurrently. A broker outage ends the pass early (the re-drives
    already committed keep a fresh deadline and are re-driven again once it passes).
    """
    started = time.monotonic()
    now = now or utcnow()
    limit = limit or binding.settings.recovery_batch
    report = RecoveryReport(dry_run=dry_run)
    store = binding.store
    with store.read() as conn:
        overdue = overdue_sagas(conn, now, limit)
        stalled = stalled_sagas(conn, now, limit)
    due = _really_stalled(binding, [saga_id for saga_id, _ in stalled], now) if stalled else {}
    queued = queued_steps(binding, due)
    if dry_run:
        report.redriven = [s for s in due if s not in queued]
        report.held = [s for s in due if s in queued]
        report.stalled = len(due)
        report.rescheduled = len(stalled) - report.stalled
        report.deadline_compensated = overdue
        report.duration_s = time.monotonic() - started
        return report
    work: list[tuple[str, Event, Precondition]] = [
        (saga_id, DeadlinePassed(), _still_overdue(saga_id, now)) for saga_id in overdue
    ] + [(saga_id, Redrive(queued=queued.get(saga_id, ())), _still_stalled(binding, now, report))
         for saga_id, _ in stalled]
    for saga_id, event, precondition in work:
        try:
            decision = apply_event(binding, saga_id, event, precondition=precondition)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            report.errors.append(f"{saga_id}: {type(exc).__name__}: {exc}")
            log.error("recovery of saga %s failed: %s", saga_id, exc)
            outage = outage_of(exc)
            if outage is not None and outage.kind is OutageKind.BROKER:
                break
            continue
        if decision.ignored is not None:
            if decision.ignored.kind is IgnoreKind.NOT_DUE:
                report.rescheduled += 1
                continue
            if decision.ignored.kind is not IgnoreKind.PRECONDITION and isinstance(event, Redrive):
                report.stalled += 1
            report.skipped += 1
            if decision.ignored.kind is IgnoreKind.PAST_PIVOT:
                _forget_deadline(binding, saga_id)
        elif isinstance(event, DeadlinePassed):
            report.deadline_compensated.append(saga_id)
        elif decision.dispatches:
            report.stalled += 1
            report.redriven.append(saga_id)
            log.warning("saga %s made no progress past its deadline: re-driven (%s)", saga_id,
                        ", ".join(f"{d.step}:{d.phase}#{d.attempt}" for d in decision.dispatches))
        else:
            report.stalled += 1
            report.held.append(saga_id)
            log.info("saga %s made no progress past its deadline: not re-driven, its message "
                     "still waits in the broker (%s)", saga_id,
                     ", ".join(queued.get(saga_id, ())))
    report.duration_s = time.monotonic() - started
    if report.redriven or report.deadline_compensated or report.errors or report.held:
        log.warning(report.summary())
    return report

"""Why a saga makes no progress: what ``sagas show``, the API, the dashboard and a metric say.

A step in flight is **stalled** when recovery has noted it since its last progress (it
re-drove the step, or held it because its message still waits in the broker), or when it is
past its deadline (``step_due``: its time limit plus the hard margin and ``RECOVERY_GRACE``,
or ``STEP_TIMEOUT`` without one) and recovery has not looked at it yet. For one saga this is
worked out from its log, the truth (``stall_of``). Lists and the ``sagas_stalled`` gauge use
one SQL test instead (``stalled_clause``): the saga row's deadline has passed (a lower bound,
moved by recovery) or its newest log row is recovery's note.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select

from sagas.coordinator import ACTION, COMPENSATION, Redrive, SagaSnapshot
from sagas.definition import Saga
from sagas.runtime.dispatch import TIME_LIMIT_HARD_MARGIN
from sagas.runtime.transitions import step_due
from sagas.settings import SagaSettings
from sagas.states import SagaState, StepState
from sagas.store.sql import Store, log_t, sagas_t

LIVE = (SagaState.PENDING, SagaState.RUNNING, SagaState.COMPENSATING)
RECOVERY_CAUSE = Redrive.__name__

Clock = Callable[[datetime], str]


def utc_clock(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M:%S UTC")


class StallReason(StrEnum):
    """Why a step in flight makes no progress."""

    QUEUED = "queued"  # its message still waits in the broker: no worker has taken it
    REDRIVEN = "redriven"  # recovery sent it again; nothing heard since
    OVERDUE = "overdue"  # past its deadline; recovery has not looked at it yet


@dataclass(frozen=True)
class StepStall:
    step: str
    phase: str
    queue: str | None
    reason: StallReason
    since: datetime  # its last progress: when the message now in flight was first sent
    looks: int  # recovery's re-drives and holds since then
    next_look: datetime  # when recovery looks at it again (past: at its next run)
    time_limit: float | None

    def sentence(self, settings: SagaSettings, clock: Clock = utc_clock) -> str:
        what = self.step if self.phase == ACTION else f"{self.step} (compensation)"
        since = clock(self.since)
        if self.reason is StallReason.QUEUED:
            return (f"{what} has waited in queue {self.queue!r} since {since}: no worker has "
                    f"taken its message (no worker serves the queue, or none is free); "
                    f"recovery does not send another, it looks again at {clock(self.next_look)}")
        if self.reason is StallReason.REDRIVEN:
            times = "once" if self.looks == 1 else f"{self.looks} times"
            return (f"{what} made no progress since {since}: re-driven {times} by recovery, "
                    f"next at {clock(self.next_look)}")
        if self.time_limit:
            bound = (f"time_limit {_s(self.time_limit)} + {_s(TIME_LIMIT_HARD_MARGIN)} hard "
                     f"limit + RECOVERY_GRACE {_s(settings.recovery_grace)}")
        else:
            bound = f"no time_limit: STEP_TIMEOUT {_s(settings.step_timeout)}"
        return (f"{what} made no progress since {since}, past its deadline ({bound}); "
                "recovery re-drives it at its next run")

    def as_dict(self, settings: SagaSettings, clock: Clock = utc_clock) -> dict[str, Any]:
        return {
            "step": self.step, "phase": self.phase, "queue": self.queue,
            "reason": str(self.reason), "since": self.since.isoformat(), "looks": self.looks,
            "next_look": self.next_look.isoformat(), "time_limit": self.time_limit,
            "detail": self.sentence(settings, clock),
        }


@dataclass(frozen=True)
class Stall:
    """A saga's stalled steps (at least one)."""

    steps: tuple[StepStall, ...]

    @property
    def since(self) -> datetime:
        return min(s.since for s in self.steps)

    @property
    def reasons(self) -> list[StallReason]:
        return list(dict.fromkeys(s.reason for s in self.steps))

    def reason(self, settings: SagaSettings, clock: Clock = utc_clock) -> str:
        return "; ".join(s.sentence(settings, clock) for s in self.steps)

    def as_dict(self, settings: SagaSettings, clock: Clock = utc_clock) -> dict[str, Any]:
        """``stalled`` in ``sagas show --json`` and ``GET /sagas/{id}``."""
        return {
            "since": self.since.isoformat(), "reasons": [str(r) for r in self.reasons],
            "reason": self.reason(settings, clock),
            "steps": [s.as_dict(settings, clock) for s in self.steps],
        }


_PHASE = {StepState.RUNNING: ACTION, StepState.COMPENSATING: COMPENSATION}


def stall_of(
    settings: SagaSettings, saga: Saga | None, snap: SagaSnapshot, now: datetime
) -> Stall | None:
    """Why ``snap`` (replayed from its log) makes no progress at ``now``, or None."""
    if snap.state not in LIVE:
        return None
    order: Sequence[str] = saga.order if saga is not None else list(snap.steps)
    found = []
    for name in order:
        step = snap.steps.get(name)
        phase = _PHASE.get(step.state) if step is not None else None
        if step is None or phase is None:
            continue
        spec = saga.steps.get(name) if saga is not None else None
        due = step_due(settings, saga, step)
        if step.redrives:
            reason = StallReason.QUEUED if step.held else StallReason.REDRIVEN
            since = step.stalled_since or step.since or due
        elif due < now:
            reason, since = StallReason.OVERDUE, step.since or due
        else:
            continue
        found.append(StepStall(
            name, phase, spec.target_queue if spec is not None else None, reason,
            _aware(since), step.redrives, _aware(due),
            spec.time_limit if spec is not None else None,
        ))
    return Stall(tuple(found)) if found else None


def stalled_clause(now: datetime) -> ColumnElement[bool]:
    """Live sagas that look stalled, in SQL (lists and the gauge; see the module docstring)."""
    newest = (
        select(log_t.c.cause).where(log_t.c.saga_id == sagas_t.c.id)
        .order_by(log_t.c.seq.desc()).limit(1).correlate(sagas_t).scalar_subquery()
    )
    clause: ColumnElement[bool] = sagas_t.c.state.in_([str(s) for s in LIVE]) & or_(
        sagas_t.c.stall_deadline < now, newest == RECOVERY_CAUSE
    )
    return clause


def stalled_among(store: Store, saga_ids: Sequence[str], now: datetime) -> set[str]:
    """Which of ``saga_ids`` look stalled (``stalled_clause``), in one query."""
    if not saga_ids:
        return set()
    with store.read() as conn:
        rows = conn.execute(
            select(sagas_t.c.id).where(sagas_t.c.id.in_(list(saga_ids)), stalled_clause(now))
        ).all()
    return {str(r.id) for r in rows}


def stalled_counts(store: Store, now: datetime) -> dict[str, int]:
    """Live sagas that look stalled, per saga name (the ``sagas_stalled`` gauge)."""
    with store.read() as conn:
        rows = conn.execute(
            select(sagas_t.c.name, func.count()).where(stalled_clause(now))
            .group_by(sagas_t.c.name)
        ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _s(seconds: float) -> str:
    return f"{seconds:g} s"

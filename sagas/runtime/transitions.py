"""The engine's working loop: load a saga under lock, decide, record, commit, then publish.

Every function takes the ``Binding`` it works for: the app it publishes through, the store it
records in and the sagas it decides with. Nothing here reads a process-wide default.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from sagas.coordinator import (
    ACTION,
    CancelRequested,
    Decision,
    Event,
    Ignored,
    IgnoreKind,
    LockGranted,
    LockWaiting,
    Redrive,
    RetryRequested,
    SagaSnapshot,
    Started,
    StepSnapshot,
    StepSucceeded,
    decide,
    decide_success_alone,
)
from sagas.definition import LockPolicy, Saga, Step
from sagas.errors import OutageKind, SagaLockedError, SagaNotFoundError, outage_of
from sagas.observe.listeners import notify, refused_event
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import TIME_LIMIT_HARD_MARGIN, publish
from sagas.runtime.message import StepContext
from sagas.runtime.revoke import revoke
from sagas.settings import SagaSettings
from sagas.states import SAGA_SETTLED, SAGA_TERMINAL, SagaState, StepState
from sagas.store import locks, outages
from sagas.store import sql as store_sql
from sagas.store.sql import deadline_after, input_digest

log = logging.getLogger("sagas")


def stall_deadline(
    settings: SagaSettings, saga: Saga | None, snap: SagaSnapshot
) -> datetime | None:
    """When recovery should look at this saga if nothing more is heard from it.

    Each step in flight is due by ``step_due``; the saga is due when its last one is.
    """
    if snap.state in SAGA_SETTLED:
        return None
    due: datetime | None = None
    for step in snap.steps.values():
        if step.state not in (StepState.RUNNING, StepState.COMPENSATING):
            continue
        at = step_due(settings, saga, step)
        due = at if due is None or at > due else due
    return due


def step_span(settings: SagaSettings, spec: Step | None) -> float:
    """How long a delivery of ``spec`` may take before recovery may send another.

    A step with a time limit is killed by Celery at its hard limit (``TIME_LIMIT_HARD_MARGIN``
    past it): past that plus ``recovery_grace`` (for the kill's failure callback to arrive)
    no delivery can still be running. Nothing bounds a step without one: ``step_timeout``.
    """
    limit = spec.time_limit if spec is not None else None
    if limit:
        return limit + TIME_LIMIT_HARD_MARGIN + settings.recovery_grace
    return settings.step_timeout


def redrive_wait(span: float, redrives: int, ceiling: float) -> float:
    """Seconds after a step's last move before recovery looks again: its span at first, then
    doubling with each re-drive (or hold) that brought no progress, up to ``ceiling``."""
    if redrives <= 0:
        return span
    return max(span, min(ceiling, span * 2.0 ** min(redrives, 32)))


def step_due(settings: SagaSettings, saga: Saga | None, step: StepSnapshot) -> datetime:
    """When a step in flight is overdue: sent at ``since``, plus the delay it was sent with,
    plus its span (backed off by recovery's notes since its last progress)."""
    spec = saga.steps.get(step.name) if saga is not None else None
    wait = redrive_wait(step_span(settings, spec), step.redrives, settings.recovery_backoff_max)
    sent = step.since or store_sql.utcnow()  # the module's clock: sagas.testing moves it
    return sent + timedelta(seconds=wait + step.countdown)


def _moved(snap: SagaSnapshot, decision: Decision) -> None:
    """Steps this decision moved were sent just now (the replay will say so from the log)."""
    now = store_sql.utcnow()
    for name in decision.changed_steps:
        step = snap.steps.get(name)
        if step is not None:
            step.since = now


def start_saga(
    binding: Binding,
    saga: Saga | str,
    data: Any,
    *,
    saga_id: str | None = None,
    idempotency_key: str | None = None,
    version: int | None = None,
) -> str:
    """Record a new saga and publish its first steps; a duplicate start returns the first id.

    The instance runs on ``version`` of the saga (the newest registered when None) for good.
    """
    definition = saga if isinstance(saga, Saga) else binding.saga(saga, version)
    payload = definition.validate_input(data)
    saga_id = saga_id or str(uuid.uuid4())
    # The digest only serves to refuse a reused idempotency key with another payload.
    digest = input_digest(payload) if idempotency_key is not None else None
    snap = SagaSnapshot(
        id=saga_id, name=definition.name, state=SagaState.PENDING, input=payload,
        steps={n: StepSnapshot(n) for n in definition.order},
        version=definition.version, fingerprint=definition.fingerprint,
    )
    deadline_at = deadline_after(definition.deadline) if definition.deadline else None
    if definition.locks is not None:
        recorded, new, decision, event = _start_locked(
            binding, definition, snap, idempotency_key=idempotency_key, digest=digest,
            deadline_at=deadline_at,
        )
    else:
        event = Started()
        decision = decide(definition, snap, event)
        _moved(snap, decision)
        recorded, new = binding.store.start(
            snap, decision, idempotency_key=idempotency_key, digest=digest,
            stall_deadline=stall_deadline(binding.settings, definition, snap),
            deadline_at=deadline_at,
        )
    if not new:
        if recorded == saga_id:
            # The same id again: a redelivered start, or the message of a delayed start whose
            # saga waits PENDING. Started changes nothing on a saga that already runs.
            apply_event(binding, saga_id, Started())
        else:
            log.info("duplicate start of saga %s ignored", recorded)
        return recorded
    notify(snap, decision, event)
    try:
        (binding.publisher or publish)(binding, definition, snap, decision.dispatches)
    except Exception as exc:
        outage = outage_of(exc)
        if outage is None or outage.kind is not OutageKind.BROKER:
            raise
        # The saga is recorded: it is not lost, only late. Its first steps are re-driven by
        # recovery once the broker answers (one line per outage, not one per start).
        outages.down("broker", exc,
                     "the broker is unavailable: sagas are recorded and their first steps "
                     "wait for recovery to publish them")
    else:
        outages.up("broker")
    return saga_id


class _Duplicate(Exception):
    """Inside a start's transaction: its id is taken; roll back what the start did."""


def _start_locked(
    binding: Binding, definition: Saga, snap: SagaSnapshot, *, idempotency_key: str | None,
    digest: str | None, deadline_at: datetime | None,
) -> tuple[str, bool, Decision, Event]:
    """A start that takes its saga's semantic locks in the transaction that records it.

    All keys free: it starts. A key held: ``wait`` records it WAITING behind that key (it
    starts when the key frees, in arrival order); ``reject`` records nothing and raises
    ``SagaLockedError`` naming the key and its holder.
    """
    store = binding.store
    keys = definition.lock_keys(snap.input)
    if idempotency_key is not None:
        with store.read() as conn:  # a repeat by key is the first saga, not a lock conflict
            existing = store.find_existing(conn, snap.id, idempotency_key, digest)
        if existing is not None:
            return existing, False, Decision(), Started()
    try:
        with store.begin() as conn:
            blocked = locks.take(conn, snap.id, keys)
            event: Event
            if blocked is None:
                event = Started()
            elif definition.on_locked is LockPolicy.REJECT:
                raise SagaLockedError(
                    f"saga {definition.name!r} needs key {blocked.key!r}, held by saga "
                    f"{blocked.holder}", key=blocked.key, holder=blocked.holder,
                )
            else:
                event = LockWaiting(blocked.key, blocked.holder)
                locks.wait_for(conn, blocked.key, snap.id)
            decision = decide(definition, snap, event)
            _moved(snap, decision)
            if not store.insert_saga(
                conn, snap, decision, cause=type(event).__name__,
                idempotency_key=idempotency_key, digest=digest,
                stall_deadline=stall_deadline(binding.settings, definition, snap),
                deadline_at=deadline_at,
            ):
                raise _Duplicate()
    except _Duplicate:
        with store.read() as conn:
            existing = store.find_existing(conn, snap.id, idempotency_key, digest)
        return existing or snap.id, False, Decision(), Started()
    return snap.id, True, decision, event


def record_pending_start(
    binding: Binding,
    saga: Saga | str,
    data: Any,
    *,
    saga_id: str,
    idempotency_key: str | None = None,
    version: int | None = None,
    not_before: datetime,
) -> str:
    """Record a saga PENDING, to be started at ``not_before`` (a delayed start).

    Its start message does it then; if that message is lost, the reconciler starts the saga
    once its deadline (``not_before``) has passed. Returns the saga's id (the first one's,
    for a duplicate).
    """
    definition = saga if isinstance(saga, Saga) else binding.saga(saga, version)
    payload = definition.validate_input(data)
    digest = input_digest(payload) if idempotency_key is not None else None
    snap = SagaSnapshot(
        id=saga_id, name=definition.name, state=SagaState.PENDING, input=payload,
        steps={n: StepSnapshot(n) for n in definition.order},
        version=definition.version, fingerprint=definition.fingerprint,
    )
    deadline_at = deadline_after(definition.deadline) if definition.deadline else None
    recorded, _ = binding.store.start(
        snap, Decision(), idempotency_key=idempotency_key, digest=digest,
        stall_deadline=not_before, deadline_at=deadline_at, cause="Recorded",
    )
    return recorded


def record_success(
    binding: Binding, saga: Saga, ctx: StepContext, attempt: int, result: Any
) -> Decision:
    """A step's success, recorded where it ran, then its consequences published.

    When the graph alone decides what follows (``Saga.success_shape``), one statement records
    it, refused by the database if the saga stopped running or the success was recorded
    before; otherwise (or when refused) the success is decided under the saga's lock.
    """
    event = StepSucceeded(ctx.step, ctx.phase, result, attempt)
    if ctx.phase == ACTION:
        snap = SagaSnapshot(
            id=ctx.saga_id, name=saga.name, state=SagaState.RUNNING, input=ctx.input,
            steps={n: StepSnapshot(n, StepState.SUCCEEDED, result=r)
                   for n, r in ctx.results.items() if n in saga.steps},
            version=saga.version, fingerprint=saga.fingerprint,
        )
        decision = decide_success_alone(saga, snap, ctx.step, attempt, result)
        if decision is not None:
            recorded, started_at = binding.store.record_alone(
                snap, decision, step=ctx.step, fingerprint=saga.fingerprint,
            )
            if recorded:
                notify(snap, decision, event, started_at)
                (binding.publisher or publish)(binding, saga, snap, decision.dispatches)
                return decision
    return apply_event(binding, ctx.saga_id, event)


def apply_event(
    binding: Binding,
    saga_id: str,
    event: Event,
    *,
    precondition: Callable[[Connection, SagaSnapshot], Ignored | None] | None = None,
) -> Decision:
    """Apply one event to one saga; duplicates and late callbacks are logged and ignored.

    ``precondition`` runs under the saga's row lock before deciding; a reason it returns makes
    the event ignored (racing reconcilers re-check staleness there, so one re-drive wins).
    """
    store = binding.store
    touch = False
    granted: Granted = []
    with store.begin() as conn:
        snap = store.load(conn, saga_id)
        if snap is None:
            log.warning("event %r for unknown saga %s ignored", event, saga_id)
            return Decision(ignored=Ignored(IgnoreKind.UNKNOWN_SAGA, f"unknown saga {saga_id}"))
        definition = binding.find(snap.name, snap.version)
        mismatch = _definition_mismatch(snap, definition)
        if mismatch is not None:
            log.warning("saga %s: %s ignored: %s", saga_id, type(event).__name__, mismatch)
            refused_event(snap.id, snap.name, snap.version, mismatch.kind)
            return Decision(ignored=mismatch)
        assert definition is not None
        refused = precondition(conn, snap) if precondition is not None else None
        if refused is not None:
            decision = Decision(ignored=refused)
        else:
            if definition.locks is not None and snap.state is SagaState.PENDING and isinstance(
                event, Started | Redrive | RetryRequested
            ):
                event = _take_locks_to_start(conn, definition, snap, event)
            decision = decide(definition, snap, event)
        started_at = None
        if decision.changed:
            _moved(snap, decision)
            # Recovery's own decisions also move the deadline it found passed.
            touch = isinstance(event, Redrive | RetryRequested)
            started_at = store.append(
                conn, snap, decision, cause=type(event).__name__,
                subject=getattr(event, "step", None),
                stall_deadline=stall_deadline(binding.settings, definition, snap),
                touch=touch,
            )
            if definition.locks is not None and decision.saga_changed \
                    and snap.state in SAGA_TERMINAL:
                # Its keys go to the sagas waiting for them, in this same transaction.
                granted = _release(binding, conn, snap.id)
    if decision.ignored:
        log.info("saga %s: %s ignored: %s", saga_id, type(event).__name__, decision.ignored)
    notify(snap, decision, event, started_at)  # listeners, after the commit
    revoke(binding, snap, decision.revokes)  # before the compensations it may overtake
    (binding.publisher or publish)(binding, definition, snap, decision.dispatches)
    for waiter_definition, waiter, waiter_decision, waiter_event in granted:
        notify(waiter, waiter_decision, waiter_event)
        (binding.publisher or publish)(binding, waiter_definition, waiter,
                                       waiter_decision.dispatches)
    return decision


Granted = list[tuple[Saga, SagaSnapshot, Decision, Event]]


def _take_locks_to_start(
    conn: Connection, definition: Saga, snap: SagaSnapshot, event: Event
) -> Event:
    """A PENDING saga with semantic locks about to start (a delayed start): its keys first.

    Held, it waits (``wait``) or is refused: with nobody to raise to, a ``reject`` saga is
    cancelled, naming the key and its holder.
    """
    blocked = locks.take(conn, snap.id, definition.lock_keys(snap.input))
    if blocked is None:
        return Started()
    if definition.on_locked is LockPolicy.REJECT:
        return CancelRequested(
            f"refused: key {blocked.key!r} is held by saga {blocked.holder}"
        )
    locks.wait_for(conn, blocked.key, snap.id)
    return LockWaiting(blocked.key, blocked.holder)


def _release(binding: Binding, conn: Connection, saga_id: str) -> Granted:
    """A settled saga gives its keys up, each to the saga that waited longest for it, in the
    same transaction; a waiter given its last key starts (published after the commit)."""
    granted: Granted = []
    for key in locks.release(conn, saga_id):
        while (waiter_id := locks.first_waiter(conn, key)) is not None:
            grant = _grant(binding, conn, key, waiter_id)
            if grant.taken:
                if grant.started is not None:
                    granted.append(grant.started)
                break  # the key went to this waiter
    return granted


@dataclass(frozen=True)
class _Grant:
    """What giving a key to a waiter did: it took it (and started, or now waits for a later
    key), or it had stopped waiting (settled meanwhile), and the key goes to the next one."""

    taken: bool
    started: tuple[Saga, SagaSnapshot, Decision, Event] | None = None


def _grant(binding: Binding, conn: Connection, key: str, waiter_id: str) -> _Grant:
    store = binding.store
    waiter = store.load(conn, waiter_id)
    definition = None if waiter is None else binding.find(waiter.name, waiter.version)
    if waiter is None or definition is None or waiter.state is not SagaState.WAITING:
        return _Grant(taken=False)
    keys = definition.lock_keys(waiter.input)
    blocked = locks.take(conn, waiter_id, keys)
    event: Event
    if blocked is None:
        event = LockGranted(key)
    else:
        locks.wait_for(conn, blocked.key, waiter_id)
        event = LockWaiting(blocked.key, blocked.holder)
    decision = decide(definition, waiter, event)
    _moved(waiter, decision)
    store.append(
        conn, waiter, decision, cause=type(event).__name__, subject=None,
        stall_deadline=stall_deadline(binding.settings, definition, waiter),
    )
    return _Grant(taken=True, started=(definition, waiter, decision, event)
                  if blocked is None else None)


_warned: set[tuple[str, int, str]] = set()


def _definition_mismatch(snap: SagaSnapshot, definition: Saga | None) -> Ignored | None:
    """Why this process must not decide for ``snap``, or None when it may.

    A worker without the instance's version changes nothing: the saga is left to a worker that
    has it (or to recovery, which re-drives it there). A graph changed under the same version is
    decided only while its steps are the instance's steps, and is reported loudly once.
    """
    if definition is None:
        return Ignored(
            IgnoreKind.UNKNOWN_VERSION,
            f"this worker has no version {snap.version} of saga {snap.name!r}; a worker that "
            "registers it (or recovery) takes the saga over",
        )
    if snap.fingerprint is None or snap.fingerprint == definition.fingerprint:
        return None
    if set(definition.steps) != set(snap.steps):
        return Ignored(
            IgnoreKind.GRAPH_CHANGED,
            f"saga {snap.name!r} v{snap.version} was started with graph {snap.fingerprint} but "
            f"this worker's v{snap.version} is {definition.fingerprint} with other steps; "
            "register the old graph as its own version (see README, Versions)",
        )
    key = (snap.name, snap.version, definition.fingerprint)
    if key not in _warned:
        _warned.add(key)
        log.error(
            "saga %r v%d changed its graph without a new version (%s started, %s here): "
            "instances in flight are decided with this worker's graph; see README, Versions",
            snap.name, snap.version, snap.fingerprint, definition.fingerprint,
        )
    return None


def _require(binding: Binding, saga_id: str) -> None:
    store = binding.store
    with store.read() as conn:
        if store.load(conn, saga_id, lock=False) is None:
            raise SagaNotFoundError(f"no saga with id {saga_id!r}")


def retry_saga(binding: Binding, saga_id: str) -> Decision:
    """Resume a parked (COMPENSATION_FAILED, FORWARD_FAILED) saga, or re-drive a stalled one."""
    _require(binding, saga_id)
    return apply_event(binding, saga_id, RetryRequested())


def cancel_saga(binding: Binding, saga_id: str, reason: str = "cancelled by operator") -> Decision:
    """A running saga compensates; refused once its pivot has succeeded."""
    _require(binding, saga_id)
    return apply_event(binding, saga_id, CancelRequested(reason))

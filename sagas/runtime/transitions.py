"""The engine's working loop: load a saga under lock, decide, record, commit, then publish.

Every function takes the ``Binding`` it works for: the app it publishes through, the store it
records in and the sagas it decides with. Nothing here reads a process-wide default.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
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
    Redrive,
    RetryRequested,
    SagaSnapshot,
    Started,
    StepSnapshot,
    StepSucceeded,
    decide,
    decide_success_alone,
)
from sagas.definition import Saga, Step
from sagas.errors import SagaNotFoundError
from sagas.observe.listeners import notify, refused_event
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import TIME_LIMIT_HARD_MARGIN, publish
from sagas.runtime.message import StepContext
from sagas.runtime.revoke import revoke
from sagas.settings import SagaSettings
from sagas.states import SAGA_SETTLED, SagaState, StepState
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
    decision = decide(definition, snap, Started())
    _moved(snap, decision)
    deadline_at = deadline_after(definition.deadline) if definition.deadline else None
    recorded, new = binding.store.start(
        snap, decision, idempotency_key=idempotency_key, digest=digest,
        stall_deadline=stall_deadline(binding.settings, definition, snap),
        deadline_at=deadline_at,
    )
    if not new:
        log.info("duplicate start of saga %s ignored", recorded)
        return recorded
    notify(snap, decision, Started())
    (binding.publisher or publish)(binding, definition, snap, decision.dispatches)
    return saga_id


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
    if decision.ignored:
        log.info("saga %s: %s ignored: %s", saga_id, type(event).__name__, decision.ignored)
    notify(snap, decision, event, started_at)  # listeners, after the commit
    revoke(binding, snap, decision.revokes)  # before the compensations it may overtake
    (binding.publisher or publish)(binding, definition, snap, decision.dispatches)
    return decision


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

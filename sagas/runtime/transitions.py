"""The engine's working loop: load a saga under lock, decide, record, commit, then publish.

Every function takes the ``Binding`` it works for: the app it publishes through, the store it
records in and the sagas it decides with. Nothing here reads a process-wide default.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from sagas.coordinator import (
    CancelRequested,
    Decision,
    Event,
    Ignored,
    IgnoreKind,
    RetryRequested,
    SagaSnapshot,
    Started,
    StepSnapshot,
    decide,
)
from sagas.definition import Saga
from sagas.errors import SagaNotFoundError
from sagas.observe.listeners import notify, refused_event
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import publish
from sagas.settings import SagaSettings
from sagas.states import SAGA_SETTLED, SagaState, StepState
from sagas.store.sql import deadline_after, input_digest

log = logging.getLogger("sagas")


def _stall_deadline(
    settings: SagaSettings, saga: Saga, snap: SagaSnapshot, decision: Decision
) -> datetime | None:
    """When recovery should look at this saga if nothing more is heard from it."""
    if snap.state in SAGA_SETTLED:
        return None
    in_flight = [
        s.name for s in snap.steps.values()
        if s.state in (StepState.RUNNING, StepState.COMPENSATING)
    ]
    limit = max(
        (saga.steps[n].time_limit or settings.step_timeout for n in in_flight),
        default=settings.step_timeout,
    )
    countdown = max((d.countdown for d in decision.dispatches), default=0.0)
    return deadline_after(limit + countdown)


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
    # A freshly generated id without an idempotency key cannot be a duplicate: skip the lookup
    # (a collision would still fail the primary key and take the IntegrityError path below).
    fresh = saga_id is None and idempotency_key is None
    saga_id = saga_id or str(uuid.uuid4())
    # The digest only serves to refuse a reused idempotency key with another payload.
    digest = input_digest(payload) if idempotency_key is not None else None
    snap = SagaSnapshot(
        id=saga_id, name=definition.name, state=SagaState.PENDING, input=payload,
        steps={n: StepSnapshot(n) for n in definition.order},
        version=definition.version, fingerprint=definition.fingerprint,
    )
    decision = decide(definition, snap, Started())
    store = binding.store
    deadline_at = deadline_after(definition.deadline) if definition.deadline else None
    try:
        with store.begin() as conn:
            existing = (
                None if fresh else store.find_existing(conn, saga_id, idempotency_key, digest)
            )
            if existing is not None:
                log.info("duplicate start of saga %s ignored", existing)
                return existing
            store.insert_new(
                conn, snap, decision, idempotency_key=idempotency_key, digest=digest,
                stall_deadline=_stall_deadline(binding.settings, definition, snap, decision),
                deadline_at=deadline_at,
            )
    except IntegrityError:
        # Lost a race with an identical start: the winner's saga is the saga.
        with store.begin() as conn:
            existing = store.find_existing(conn, saga_id, idempotency_key, digest)
        if existing is None:
            raise
        return existing
    notify(snap, decision, Started())
    (binding.publisher or publish)(binding, definition, snap, decision.dispatches)
    return saga_id


def apply_event(
    binding: Binding,
    saga_id: str,
    event: Event,
    *,
    precondition: Callable[[Connection], str | None] | None = None,
) -> Decision:
    """Apply one event to one saga; duplicates and late callbacks are logged and ignored.

    ``precondition`` runs under the saga's row lock before deciding; a reason it returns makes
    the event ignored (racing reconcilers re-check staleness there, so one re-drive wins).
    """
    store = binding.store
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
        refused = precondition(conn) if precondition is not None else None
        if refused:
            decision = Decision(ignored=Ignored(IgnoreKind.PRECONDITION, refused))
        else:
            decision = decide(definition, snap, event)
        started_at = None
        if decision.changed:
            deadline = _stall_deadline(binding.settings, definition, snap, decision)
            started_at = store.save(conn, snap, decision, deadline)
    if decision.ignored:
        log.info("saga %s: %s ignored: %s", saga_id, type(event).__name__, decision.ignored)
    notify(snap, decision, event, started_at)  # listeners, after the commit
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
    """Resume a parked (COMPENSATION_FAILED) saga, or re-drive a stalled running one."""
    _require(binding, saga_id)
    return apply_event(binding, saga_id, RetryRequested())


def cancel_saga(binding: Binding, saga_id: str, reason: str = "cancelled by operator") -> Decision:
    """A running saga compensates; refused once its pivot has succeeded."""
    _require(binding, saga_id)
    return apply_event(binding, saga_id, CancelRequested(reason))

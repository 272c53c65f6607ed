"""Calling off actions that have not started, at no cost to a step on the happy path.

When a saga is cancelled (or its own deadline passes) while an action's message still waits
for a worker, that action must never run: running it would only charge the customer for the
compensation to refund them. Two mechanisms, neither of which reads anything per step:

- **Revoke.** After the decision commits, the action messages of every step in flight (all of
  its attempts' task ids) are revoked through the app's remote control: one broadcast. Every
  connected worker keeps the ids and discards such a message instead of running it; the
  engine hears of it (Celery's ``task_revoked`` signal, in the worker's main process) and
  reports it to the saga queue as the step's failure, ``ActionRevoked``, so the rollback goes
  on at once. A revoked report does not prove that no other delivery of the step ran, so the
  step is compensated (compensations tolerate a missing effect).
- **Refusal.** A broadcast reaches only the workers connected when it is sent; a pool that was
  down (or cut off) then never hears it. So a worker remembers when its main process last
  (re)connected to the broker, and before running an action whose message was sent before that
  (plus ``CONNECT_MARGIN``) it reads whether its saga was called off (one indexed read of the
  saga's row and log): if so, the action is not run and reported as revoked, as above. Messages
  sent while the worker was connected skip the read; a process with no record of its
  connection (not a Celery worker) always reads. A saga rolling back because a step failed
  issues no revoke, so its actions run as they always have (their successes are compensated).

The pivot is never revoked: it has no compensation, so only its own outcome may decide.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import exists, select

from sagas.coordinator import ACTION, CancelRequested, DeadlinePassed, Revoke, SagaSnapshot
from sagas.errors import ActionRevoked
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import STEP_FAILED_TASK
from sagas.runtime.message import step_task_id
from sagas.states import SagaState
from sagas.store.sql import Store, log_t, sagas_t

log = logging.getLogger("sagas.revoke")

CONNECT_MARGIN = 5.0
"""Seconds after a (re)connect during which messages are still checked: the remote-control
consumer starts a moment after the connection, and clocks of two machines differ a little."""

REVOKED = "its saga was called off before it started: never run"
ROLLING_BACK = (SagaState.COMPENSATING, SagaState.COMPENSATED, SagaState.COMPENSATION_FAILED)
CALLED_OFF_BY = (CancelRequested.__name__, DeadlinePassed.__name__)
"""A saga rolling back after one of these decisions was called off: its actions in flight
were revoked, and one that has not started must not start."""

_connected: Any = None
"""When this worker's main process last connected to the broker (epoch seconds), in memory
its forked pool processes share; None outside a worker."""


def track_connections() -> None:
    """In a worker's main process, before its pool forks (``worker_init``)."""
    global _connected
    if _connected is None:
        _connected = multiprocessing.RawValue("d", 0.0)


def connected(at: float | None = None) -> None:
    """The worker's main process (re)connected: broadcasts sent before it were missed."""
    if _connected is not None:
        _connected.value = time.time() if at is None else at


def may_have_missed_a_revoke(binding: Binding, sent: float) -> bool:
    """Whether an action message sent at ``sent`` may have been revoked unheard here.

    A binding with a revoker of its own (``sagas.testing``) delivers every revoke itself.
    """
    if binding.revoker is not None:
        return False
    since = 0.0 if _connected is None else float(_connected.value)
    return since <= 0.0 or sent <= 0.0 or sent < since + CONNECT_MARGIN


def called_off(store: Store, saga_id: str) -> bool:
    """Whether the saga was called off (cancelled, or past its own deadline) and rolls back."""
    cancelled = exists().where(log_t.c.saga_id == sagas_t.c.id,
                               log_t.c.cause.in_(CALLED_OFF_BY))
    with store.read() as conn:
        found = conn.execute(
            select(sagas_t.c.id).where(sagas_t.c.id == saga_id,
                                       sagas_t.c.state.in_([str(s) for s in ROLLING_BACK]),
                                       cancelled)
        ).first()
    return found is not None


def task_ids(saga_id: str, revokes: Sequence[Revoke]) -> list[str]:
    return [step_task_id(saga_id, r.step, ACTION, n) for r in revokes
            for n in range(1, r.upto + 1)]


def revoke(binding: Binding, snap: SagaSnapshot, revokes: Sequence[Revoke]) -> None:
    """After the commit: revoke the action messages that must not start (best effort)."""
    if not revokes:
        return
    ids = task_ids(snap.id, revokes)
    if binding.revoker is not None:
        binding.revoker(binding, ids)
        return
    try:
        binding.app.control.revoke(ids)
    except Exception as exc:  # the refusal still stops a worker that did not hear it
        log.warning("saga %s: could not revoke %s: %s", snap.id, ", ".join(ids), exc)


def report(app: Celery, queue: str, task_id: str, saga_id: str, step: str, phase: str,
           attempt: int) -> None:
    """Tell the coordinator that this delivery was revoked, never run (its failure handler)."""
    app.send_task(STEP_FAILED_TASK, args=(task_id, saga_id, step, phase, attempt),
                  kwargs={"revoked": True}, queue=queue)


def report_revoked_request(binding: Binding, request: Any) -> bool:
    """A request Celery discarded as revoked: report it when it is a saga action's delivery.

    Its failure callback (the ``link_error`` the engine gave it) names the saga, the step and
    the attempt; Celery calls no callback for a revoked task, so the engine sends it.
    """
    task_id = getattr(request, "id", None)
    for errback in getattr(request, "errbacks", None) or ():
        if not isinstance(errback, dict) or errback.get("task") != STEP_FAILED_TASK:
            continue
        args: Sequence[Any] = errback.get("args") or ()
        if len(args) == 4 and args[2] == ACTION and isinstance(task_id, str):
            saga_id, step, phase, attempt = args
            report(binding.app, binding.settings.saga_queue, task_id, saga_id, step, phase,
                   int(attempt))
            log.info("saga %s: %s (%s) revoked before it started", saga_id, step, task_id)
            return True
    return False


def revoked_error() -> str:
    """The step's error for a revoked delivery, as the failure handler records it."""
    return f"{ActionRevoked.__name__}: {REVOKED}"

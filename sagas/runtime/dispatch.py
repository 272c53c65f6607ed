"""Turning decided dispatches into Celery messages, published through the binding's own app.

A step message carries the saga context as its one argument (so Flower shows saga id and step),
a ``link_error`` to the coordinator's failure handler on the saga queue (a ``bind=True`` task, so
Celery sends it as a message rather than calling it inline), and, only for tasks the engine
cannot run inline, a ``link`` to the coordinator's success handler. Tasks the engine wraps
record their own success where they ran and publish what became ready: one broker message per
step, like a plain chain.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery
from celery.canvas import Signature

from sagas.coordinator import ACTION, Dispatch, SagaSnapshot
from sagas.definition import Saga
from sagas.observe import tracing
from sagas.runtime.binding import Binding
from sagas.runtime.message import StepContext, step_task_id

STEP_FAILED_TASK = "sagas.step_failed"
STEP_SUCCEEDED_TASK = "sagas.step_succeeded"
START_TASK = "sagas.start"
RECOVER_TASK = "sagas.recover_stalled"
TIME_LIMIT_HARD_MARGIN = 5.0
INLINE_MARK = "__sagas_inline__"
"""Attribute the engine sets on a task it wraps: such a task records its own outcome."""


def runs_inline(app: Celery, name: str) -> bool:
    task = app.tasks.get(name)
    return task is not None and bool(getattr(task, INLINE_MARK, False))


def build_signature(
    app: Celery, saga_queue: str, saga: Saga, snap: SagaSnapshot, dispatch: Dispatch
) -> Signature:
    step = saga.steps[dispatch.step]
    name = step.action_name if dispatch.phase == ACTION else step.compensation_name
    assert name is not None, "a compensation is only dispatched when the step declares one"
    inline = runs_inline(app, name)
    options: dict[str, Any] = {
        "queue": step.target_queue,
        "task_id": step_task_id(snap.id, dispatch.step, dispatch.phase, dispatch.attempt),
        "link_error": app.signature(
            STEP_FAILED_TASK,
            args=(snap.id, dispatch.step, dispatch.phase, dispatch.attempt),
            queue=saga_queue,
        ),
    }
    if not inline:
        options["link"] = app.signature(
            STEP_SUCCEEDED_TASK, args=(snap.id, dispatch.step, dispatch.phase), queue=saga_queue
        )
    if dispatch.countdown > 0:
        options["countdown"] = dispatch.countdown
    if step.time_limit and dispatch.phase == ACTION:
        options["soft_time_limit"] = step.time_limit
        options["time_limit"] = step.time_limit + TIME_LIMIT_HARD_MARGIN
    if tracing.ENABLED:  # the saga's trace context rides in the message headers
        tracing.add_headers(options, snap.id)
    # Celery would saferepr the whole context (input and every result) into each message;
    # a short repr naming saga and step keeps Flower searchable at a fraction of the CPU.
    options["argsrepr"] = (
        f"({{'saga_id': {snap.id!r}, 'step': {dispatch.step!r}, 'phase': {dispatch.phase!r}, "
        f"'attempt': {dispatch.attempt}}},)"
    )
    options["kwargsrepr"] = "{}"
    context = StepContext.build(
        saga_id=snap.id, saga=saga.name, step=dispatch.step, phase=dispatch.phase,
        attempt=dispatch.attempt, version=saga.version,
        after_pivot=dispatch.step in saga.after_pivot,
        inline=inline, input=snap.input, results=snap.results(), sent=time.time(),
        locks=saga.lock_keys(snap.input) if saga.locks is not None else (),
    )
    return app.signature(name, args=(context,), **options)


def publish(
    binding: Binding, saga: Saga, snap: SagaSnapshot, dispatches: list[Dispatch]
) -> None:
    """Send the dispatched steps through the binding's app (never ``current_app``)."""
    if not dispatches:
        return
    app = binding.app
    queue = binding.settings.saga_queue
    signatures = [build_signature(app, queue, saga, snap, d) for d in dispatches]
    if len(signatures) == 1:
        signatures[0].apply_async()
        return
    with app.producer_or_acquire() as producer:
        for sig in signatures:
            sig.apply_async(producer=producer)

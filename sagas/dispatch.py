"""Turning decided dispatches into Celery messages.

A step message carries the saga context as its one argument (so Flower shows saga id and step),
a ``link_error`` to the coordinator's failure handler on the saga queue (a ``bind=True`` task, so
Celery sends it as a message rather than calling it inline), and, only for tasks the engine
cannot run inline, a ``link`` to the coordinator's success handler. Tasks built on ``SagaTask``
record their own success where they ran and publish what became ready: one broker message per
step, like a plain chain.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, current_app
from celery.canvas import Signature

from sagas import tracing
from sagas.coordinator import ACTION, Dispatch, SagaSnapshot
from sagas.definition import Saga
from sagas.settings import get_settings

STEP_FAILED_TASK = "sagas.step_failed"
STEP_SUCCEEDED_TASK = "sagas.step_succeeded"
TIME_LIMIT_HARD_MARGIN = 5.0


def step_task_id(saga_id: str, step: str, phase: str, attempt: int) -> str:
    """Readable task ids: searching a saga id in Flower finds all of its tasks."""
    return f"{saga_id}.{step}.{'do' if phase == ACTION else 'undo'}.{attempt}"


def idempotency_key(saga_id: str, step: str) -> str:
    return f"{saga_id}:{step}"


def build_context(
    saga: Saga, snap: SagaSnapshot, dispatch: Dispatch, inline: bool
) -> dict[str, Any]:
    return {
        "saga_id": snap.id,
        "saga": saga.name,
        "step": dispatch.step,
        "phase": dispatch.phase,
        "attempt": dispatch.attempt,
        "idempotency_key": idempotency_key(snap.id, dispatch.step),
        "after_pivot": dispatch.step in saga.after_pivot,
        "inline": inline,
        "input": snap.input,
        "results": snap.results(),
    }


def runs_inline(app: Celery, name: str) -> bool:
    from sagas.worker import SagaTask

    task = app.tasks.get(name)
    return isinstance(task, SagaTask)


def build_signature(app: Celery, saga: Saga, snap: SagaSnapshot, dispatch: Dispatch) -> Signature:
    step = saga.steps[dispatch.step]
    name = step.action_name if dispatch.phase == ACTION else step.compensation_name
    assert name is not None, "a compensation is only dispatched when the step declares one"
    inline = runs_inline(app, name)
    saga_queue = get_settings().saga_queue
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
    context = build_context(saga, snap, dispatch, inline)
    return app.signature(name, args=(context,), **options)


def publish(
    saga: Saga, snap: SagaSnapshot, dispatches: list[Dispatch], app: Celery | None = None
) -> None:
    if not dispatches:
        return
    app = app or current_app
    signatures = [build_signature(app, saga, snap, d) for d in dispatches]
    if len(signatures) == 1:
        signatures[0].apply_async()
        return
    with app.producer_or_acquire() as producer:
        for sig in signatures:
            sig.apply_async(producer=producer)

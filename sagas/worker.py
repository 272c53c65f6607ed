"""The worker side: the step task base class and the coordinator's own Celery tasks.

``SagaTask`` runs a saga step, retries transient errors with the step's backoff, and on success
records the outcome and publishes the next ready steps from the worker that ran the step: the
coordinator's job done in place, which saves the hop a separate coordinator task would cost.
Failures travel by ``link_error`` to ``sagas.step_failed`` on the saga queue.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from celery.signals import worker_ready

from sagas.coordinator import ACTION, COMPENSATION, StepFailed, StepRetrying, StepSucceeded
from sagas.definition import registered_sagas
from sagas.dispatch import STEP_FAILED_TASK, STEP_SUCCEEDED_TASK
from sagas.errors import BusinessError, StepOutcomeUnknown
from sagas.runtime import apply_event, start_saga
from sagas.settings import get_settings

log = logging.getLogger("sagas.worker")

_CONTEXT_KEYS = frozenset({"saga_id", "saga", "step", "phase", "idempotency_key"})


def saga_context(args: tuple[Any, ...]) -> dict[str, Any] | None:
    """The step context when this call is a saga step, else None (a plain task call)."""
    if len(args) == 1 and isinstance(args[0], dict) and args[0].keys() >= _CONTEXT_KEYS:
        return args[0]
    return None


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def normalize_result(result: Any) -> Any:
    if result is None:
        return {}
    return result if isinstance(result, dict) else {"value": result}


class SagaTask(Task):
    """Base class for participant tasks; behaves as a plain task outside a saga."""

    # Expected refusals are logged without a traceback.
    throws = (BusinessError,)
    # task_retry_on_worker_lost: a task whose pool process dies (SIGKILL, OOM, segfault) is sent
    # again after 1 s, at most 3 times in all, then fails through link_error: a task that kills
    # its worker on every delivery cannot loop. (Transient retries pass the policy's limit.)
    max_retries = 3
    default_retry_delay = 1

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = saga_context(args)
        if ctx is None or kwargs:
            return super().__call__(*args, **kwargs)
        return _run_step(self, ctx, args)


def _run_step(task: Task, ctx: dict[str, Any], args: tuple[Any, ...]) -> Any:
    saga = registered_sagas().get(ctx["saga"])
    step = saga.steps.get(ctx["step"]) if saga else None
    saga_id, phase = ctx["saga_id"], ctx["phase"]
    attempt = int(ctx.get("attempt", 1)) + int(task.request.retries or 0)
    try:
        result = task.run(*args)
    except Retry:
        raise
    except Exception as exc:
        if step is not None:
            policy = step.retry if phase == ACTION else step.compensation_retry
            forward = bool(ctx.get("after_pivot"))
            if phase == COMPENSATION or forward:
                retryable = True
            elif isinstance(exc, SoftTimeLimitExceeded):
                retryable = False
            else:
                retryable = policy.is_transient(exc)
            if retryable and attempt < policy.attempts:
                decision = apply_event(
                    saga_id, StepRetrying(ctx["step"], phase, attempt + 1, describe(exc))
                )
                if decision.ignored and "already recorded" not in decision.ignored:
                    log.info(
                        "saga %s step %s: no retry: %s", saga_id, ctx["step"], decision.ignored
                    )
                    raise
                # The policy bounds the attempts (checked above); None would mean the task's
                # max_retries (the worker-lost cap), cutting the policy's last attempts short.
                raise task.retry(
                    exc=exc, countdown=policy.delay(attempt), max_retries=policy.attempts
                ) from exc
            uncertain = retryable or isinstance(exc, SoftTimeLimitExceeded)
            if step.pivot and phase == ACTION and uncertain:
                # A pivot that timed out or ran out of transient retries may have applied its
                # effect, and has no compensation: it stays RUNNING and recovery re-drives it
                # (same key) until it succeeds or refuses for good.
                log.warning("saga %s: pivot %s outcome unknown after attempt %d (%s); "
                            "left to recovery", saga_id, ctx["step"], attempt, describe(exc))
                raise Ignore() from exc
            if phase == ACTION and not forward and not isinstance(exc, policy.business):
                # Only a business refusal proves the effect did not happen; anything else may
                # have struck after the commit, so the failure handler compensates this step.
                raise StepOutcomeUnknown(describe(exc)) from exc
        raise
    result = normalize_result(result)
    if not ctx.get("inline"):
        return result
    if saga is not None:
        apply_event(saga_id, StepSucceeded(ctx["step"], phase, result))
    else:
        # This process cannot decide for a saga it does not know; the coordinator can.
        task.app.send_task(
            STEP_SUCCEEDED_TASK, args=(result, saga_id, ctx["step"], phase),
            queue=get_settings().saga_queue,
        )
    return result


@shared_task(name=STEP_SUCCEEDED_TASK, ignore_result=True)
def step_succeeded(result: Any, saga_id: str, step: str, phase: str) -> None:
    """``link`` target for steps the engine cannot run inline (tasks in other codebases)."""
    apply_event(saga_id, StepSucceeded(step, phase, normalize_result(result)))  # type: ignore[arg-type]


@shared_task(name=STEP_FAILED_TASK, bind=True, ignore_result=True)
def step_failed(
    self: Task, task_id: str, saga_id: str, step: str, phase: str, attempt: int
) -> None:
    """``link_error`` target; ``bind=True`` makes Celery send it as a message, never inline."""
    error = _failure_of(self, task_id)
    failed = StepFailed(step, phase, error, definite=_is_definite(error))  # type: ignore[arg-type]
    apply_event(saga_id, failed)


# Failures that say nothing about whether the step's effect happened (see StepFailed.definite).
_INDEFINITE = frozenset({
    StepOutcomeUnknown.__name__, "WorkerLostError", "TimeLimitExceeded", "Reject",
    "ConnectionError", "OperationalError", "TimeoutError", "BackendStoreError",
    "BackendGetMetaError",
})


def _is_definite(error: str) -> bool:
    if error.startswith("failed ("):  # the detail is lost with the backend: unknown
        return False
    return error.split(":", 1)[0].strip() not in _INDEFINITE


def _failure_of(task: Task, task_id: str) -> str:
    try:
        meta = task.app.backend.get_task_meta(task_id)
    except Exception as exc:  # the backend may be gone; the failure itself is not in doubt
        return f"failed (error detail unavailable: {describe(exc)})"
    status = meta.get("status")
    if status != "FAILURE":
        # Celery publishes a retry before it stores RETRY, so a slow RETRY store can overwrite
        # the final attempt's FAILURE: the stored exception is then an earlier attempt's.
        return f"failed (backend shows {status}, not the final error)"
    result = meta.get("result")
    if isinstance(result, BaseException):
        return describe(result)
    if isinstance(result, dict) and "exc_type" in result:
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(m) for m in message)
        return f"{result['exc_type']}: {message}" if message else str(result["exc_type"])
    return f"failed ({meta.get('status', 'unknown')})"


@shared_task(name="sagas.start", bind=True, ignore_result=True)
def start(
    self: Task, saga_name: str, data: dict[str, Any], idempotency_key: str | None = None
) -> str:
    """Start any registered saga by name; the task id becomes the saga id."""
    return start_saga(saga_name, data, saga_id=self.request.id, idempotency_key=idempotency_key)


@worker_ready.connect
def report_unknown_tasks(sender: Any = None, **_: Any) -> None:
    """A saga naming a task this worker cannot run is reported at start, never dropped silently."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    for saga in registered_sagas().values():
        unknown = saga.unknown_tasks(app.tasks.keys())
        if unknown:
            log.error(
                "saga %r names tasks this worker does not register: %s; a worker that "
                "registers them must serve their queues, or those steps will stall",
                saga.name, ", ".join(unknown),
            )

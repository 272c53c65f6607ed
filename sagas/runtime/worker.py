"""The worker side: the wrapper that runs saga steps, and the coordinator's own Celery tasks.

A step task runs through ``StepTaskMixin.__call__``: it retries transient errors with the step's
backoff and, on success, records the outcome and publishes the next ready steps from the worker
that ran the step: the coordinator's job done in place, which saves the hop a separate
coordinator task would cost. Failures travel by ``link_error`` to ``sagas.step_failed`` on the
saga queue. ``wrap_step_task`` puts the mixin under any task of the bound app, so the user
never sets ``task_cls``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from pydantic import ValidationError

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    IgnoreKind,
    StepFailed,
    StepRetrying,
    StepSucceeded,
)
from sagas.errors import (
    ActionRevoked,
    BusinessError,
    DefinitionError,
    RefusedAfterPivot,
    SagaError,
    StepOutcomeUnknown,
    StoreUnavailableError,
)
from sagas.runtime import poison, revoke
from sagas.runtime.binding import Binding, binding_of
from sagas.runtime.dispatch import (
    INLINE_MARK,
    START_TASK,
    STEP_FAILED_TASK,
    STEP_SUCCEEDED_TASK,
)
from sagas.runtime.message import StepContext
from sagas.runtime.transitions import apply_event, record_success, start_saga

log = logging.getLogger("sagas.worker")

WORKER_LOST_RETRY_DELAY = 1
"""Seconds before a step whose pool process died is sent again (Celery's default is 180)."""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def normalize_result(result: Any) -> Any:
    if result is None:
        return {}
    return result if isinstance(result, dict) else {"value": result}


class StepTaskMixin:
    """Runs a call that carries a step message as a saga step; any other call as usual."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            ctx = StepContext.from_args(args, kwargs)
        except ValidationError as exc:
            poison.refuse_malformed_step(self, args, exc)
        if ctx is None:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        return _run_step(self, ctx, args)


setattr(StepTaskMixin, INLINE_MARK, True)


class SagaTask(StepTaskMixin, Task):  # type: ignore[misc]
    """A task class for ``task_cls=``; the engine wraps plain tasks the same way by itself."""

    throws = (BusinessError, RefusedAfterPivot)
    default_retry_delay = WORKER_LOST_RETRY_DELAY


def wrap_step_task(task: Task, step: str | None) -> None:
    """Put ``StepTaskMixin`` under ``task`` (its class is rebuilt with the mixin first).

    What the task's own class set (``max_retries``, ``throws``, a custom ``__call__``) is kept:
    the mixin defines nothing else, and calls the task's own ``__call__`` for plain calls. The
    worker-lost retry delay and business errors as expected refusals are added only where the
    task left Celery's defaults, and only for a task a registered step names (``step``); any
    other task of the app gets the bare mixin (``step=None``), so a step message of a version
    this worker lacks is still recognised and reported, never run as a plain task.
    """
    cls = type(task)
    if getattr(cls, INLINE_MARK, False):
        return
    extra: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    expected = [e for e in (BusinessError, RefusedAfterPivot)
                if not any(issubclass(e, t) for t in cls.throws if isinstance(t, type))]
    if step is not None and expected:
        extra["throws"] = (*cls.throws, *expected)
    if step is not None and cls.default_retry_delay == Task.default_retry_delay:
        extra["default_retry_delay"] = WORKER_LOST_RETRY_DELAY
    try:
        wrapped = type(cls.__name__, (StepTaskMixin, cls), extra)
        task.__class__ = wrapped
    except TypeError as exc:
        raise DefinitionError(
            f"step {step!r}: task {task.name!r} cannot be run as a saga step ({exc}); "
            "give it the base class sagas.runtime.worker.SagaTask"
        ) from exc
    task.__trace__ = None  # a tracer built before the wrap would call the old function


def _binding(task: Task) -> Binding:
    binding = binding_of(task.app)
    if binding is None:
        raise SagaError(f"Celery app {task.app.main!r} has no saga engine: call Sagas(app)")
    return binding


def _run_step(task: Task, ctx: StepContext, args: tuple[Any, ...]) -> Any:
    binding = _binding(task)
    saga = binding.find(ctx.saga, ctx.version)
    if saga is None or ctx.step not in saga.steps:
        # An unknown version, saga or step: refused (dead-lettered) before anything runs.
        poison.refuse_unknown_step(binding, task, ctx, saga)
    step = saga.steps.get(ctx.step) if saga else None
    saga_id, phase = ctx.saga_id, ctx.phase
    attempt = ctx.attempt + int(task.request.retries or 0)
    if phase == ACTION and revoke.may_have_missed_a_revoke(binding, ctx.sent) and _called_off(
            binding, saga_id):
        # Sent before this worker could hear a revoke, and its saga is rolling back: never
        # run it; the coordinator compensates the step (see sagas.runtime.revoke).
        log.info("saga %s: %s not run: %s", saga_id, ctx.step, revoke.REVOKED)
        revoke.report(task.app, binding.settings.saga_queue, str(task.request.id), saga_id,
                      ctx.step, phase, ctx.attempt)
        raise Ignore()
    try:
        result = task.run(*args)
    except Retry:
        raise
    except Exception as exc:
        if step is not None:
            policy = step.retry if phase == ACTION else step.compensation_retry
            forward = ctx.after_pivot and phase == ACTION
            if forward and isinstance(exc, policy.business):
                # Past the pivot a refusal would only refuse again: the saga parks instead.
                raise RefusedAfterPivot(describe(exc)) from exc
            if phase == COMPENSATION or forward:
                retryable = True
            elif isinstance(exc, SoftTimeLimitExceeded):
                retryable = False
            else:
                retryable = policy.is_transient(exc)
            if retryable and attempt < policy.attempts:
                countdown = policy.delay(attempt)
                try:
                    ignored = apply_event(
                        binding, saga_id,
                        StepRetrying(ctx.step, phase, attempt + 1, describe(exc), countdown),
                    ).ignored
                except StoreUnavailableError:
                    ignored = None  # unrecorded; the next attempt's record carries its number
                if ignored is not None and ignored.kind is not IgnoreKind.ALREADY_RECORDED:
                    log.info("saga %s step %s: no retry: %s", saga_id, ctx.step, ignored)
                    raise
                # The policy bounds the attempts (checked above); None would mean the task's
                # max_retries (the worker-lost cap), cutting the policy's last attempts short.
                raise task.retry(
                    exc=exc, countdown=countdown, max_retries=policy.attempts
                ) from exc
            uncertain = retryable or isinstance(exc, SoftTimeLimitExceeded)
            if step.pivot and phase == ACTION and uncertain:
                # A pivot that timed out or ran out of transient retries may have applied its
                # effect, and has no compensation: it stays RUNNING and recovery re-drives it
                # (same key) until it succeeds or refuses for good.
                log.warning("saga %s: pivot %s outcome unknown after attempt %d (%s); "
                            "left to recovery", saga_id, ctx.step, attempt, describe(exc))
                raise Ignore() from exc
            if phase == ACTION and not forward and not isinstance(exc, policy.business):
                # Only a business refusal proves the effect did not happen; anything else may
                # have struck after the commit, so the failure handler compensates this step.
                raise StepOutcomeUnknown(describe(exc)) from exc
        raise
    result = poison.storable_result(binding, task, ctx, step, normalize_result(result))
    if not ctx.inline:
        return result
    if saga is not None:
        try:
            record_success(binding, saga, ctx, attempt, result)
        except Exception as exc:
            # The effect happened; only its record failed: the store is down, or the soft time
            # limit struck the recording statement (a database cut off). The outcome goes to
            # the saga queue, whose task records it once the store answers: never a failed
            # step. If even that cannot be sent, the failure says the outcome is unknown.
            if not isinstance(exc, StoreUnavailableError):
                log.warning("saga %s: %s succeeded, recording it failed (%s): handed to the "
                            "saga queue", saga_id, ctx.step, describe(exc))
            try:
                task.app.send_task(
                    STEP_SUCCEEDED_TASK, args=(result, saga_id, ctx.step, phase, attempt),
                    queue=binding.settings.saga_queue,
                )
            except Exception as send_exc:
                raise StepOutcomeUnknown(describe(send_exc)) from exc
    else:
        # This process cannot decide for a saga it does not know; the coordinator can.
        task.app.send_task(
            STEP_SUCCEEDED_TASK, args=(result, saga_id, ctx.step, phase),
            queue=binding.settings.saga_queue,
        )
    return result


# Failures that say nothing about whether the step's effect happened (see StepFailed.definite).
_INDEFINITE = frozenset({
    StepOutcomeUnknown.__name__, StoreUnavailableError.__name__, ActionRevoked.__name__,
    "WorkerLostError",
    "TimeLimitExceeded", "Reject",
    "ConnectionError", "OperationalError", "TimeoutError", "BackendStoreError",
    "BackendGetMetaError",
})


def _error_type(error: str) -> str:
    return error.split(":", 1)[0].strip()


def _is_definite(error: str) -> bool:
    if error.startswith("failed ("):  # the detail is lost with the backend: unknown
        return False
    return _error_type(error) not in _INDEFINITE


def failure_event(step: str, phase: str, error: str, attempt: int | None = None) -> StepFailed:
    """A step's failure as the failure handler records it, classified by its error's type."""
    return StepFailed(
        step, phase, error, definite=_is_definite(error),  # type: ignore[arg-type]
        attempt=attempt, business=_error_type(error) == RefusedAfterPivot.__name__,
    )


def _called_off(binding: Binding, saga_id: str) -> bool:
    """Whether the saga was called off (one read); when the store cannot say, it runs."""
    try:
        return revoke.called_off(binding.store, saga_id)
    except StoreUnavailableError:
        return False


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



STORE_RETRY_MAX = 30.0
"""Longest wait (s) between two tries of an engine task while the saga store is down."""

STORE_RETRY_UNBOUNDED = sys.maxsize
"""The retry cap for a store outage: none. Celery reads ``retry(max_retries=None)`` as *the
task's own cap* (3 by default), which would drop an outcome about 7 s into an outage."""


def _store_retry(task: Task, exc: StoreUnavailableError) -> Retry:
    """Hold an engine task's message in the broker until the store answers (backoff, no cap).

    The outage was logged once by the store; Celery's own retry line is enough per task.
    """
    countdown = min(STORE_RETRY_MAX, 2.0 ** min(int(task.request.retries or 0), 5))
    return task.retry(exc=exc, countdown=countdown, max_retries=STORE_RETRY_UNBOUNDED)


def install(binding: Binding) -> None:
    """Register the coordinator's tasks on the binding's app, routed to its saga queue.

    Each records through the store; while the store cannot be reached the task is retried
    (its message stays in the broker), so no outcome is lost and none is taken for a failure.
    """
    app, queue = binding.app, binding.settings.saga_queue

    @app.task(name=STEP_SUCCEEDED_TASK, bind=True, ignore_result=True, queue=queue,  # type: ignore[untyped-decorator]
              shared=False)
    def step_succeeded(
        self: Task, result: Any, saga_id: str, step: str, phase: str, attempt: int | None = None
    ) -> None:
        """``link`` target for steps the engine cannot run inline (tasks in other codebases),
        and where a step's worker hands its outcome while the store is down."""
        event = StepSucceeded(step, phase, normalize_result(result), attempt)  # type: ignore[arg-type]
        try:
            apply_event(binding, saga_id, event)
        except StoreUnavailableError as exc:
            raise _store_retry(self, exc) from exc

    @app.task(name=STEP_FAILED_TASK, bind=True, ignore_result=True, queue=queue, shared=False)  # type: ignore[untyped-decorator]
    def step_failed(
        self: Task, task_id: str, saga_id: str, step: str, phase: str, attempt: int,
        revoked: bool = False,
    ) -> None:
        """``link_error`` target; ``bind=True`` makes Celery send it as a message, not inline.

        ``attempt`` is the attempt the failed delivery was sent as (history credits it);
        ``revoked``: the delivery never ran (``sagas.runtime.revoke``).
        """
        error = revoke.revoked_error() if revoked else _failure_of(self, task_id)
        failed = failure_event(step, phase, error, attempt)
        try:
            apply_event(binding, saga_id, failed)
        except StoreUnavailableError as exc:
            raise _store_retry(self, exc) from exc

    @app.task(name=START_TASK, bind=True, ignore_result=True, queue=queue, shared=False)  # type: ignore[untyped-decorator]
    def start(
        self: Task, saga_name: str, data: dict[str, Any], idempotency_key: str | None = None
    ) -> str:
        """Start any registered saga by name; the task id becomes the saga id."""
        try:
            return start_saga(
                binding, saga_name, data, saga_id=self.request.id,
                idempotency_key=idempotency_key,
            )
        except StoreUnavailableError as exc:
            raise _store_retry(self, exc) from exc


def unknown_task_report(binding: Binding) -> list[str]:
    """One line per saga naming tasks this worker's app does not register."""
    lines = []
    known = binding.app.tasks.keys()
    for saga in binding.all_versions():
        unknown = saga.unknown_tasks(known)
        if unknown:
            lines.append(
                f"saga {saga.name!r} names tasks this worker does not register: "
                f"{', '.join(unknown)}; a worker that registers them must serve their queues, "
                "or those steps will stall"
            )
    return lines

"""A Celery task that starts a saga durably: ``task.delay(data)`` records it before returning.

A plain Celery task that calls ``engine.start`` only publishes a message: if the broker loses
it (a Redis wipe, a failover without persistence) the caller holds the id of a saga that never
existed. ``StartTask.apply_async`` (and so ``.delay``, and a signature's ``apply_async``)
instead starts the saga in the caller, exactly as ``Sagas.start`` does: the saga row and its
first decision are committed, then its first steps are published. The AsyncResult it returns
carries the saga id. From then on nothing can lose the saga: a lost step message is re-driven
by recovery. A store that cannot be reached raises ``StoreUnavailableError`` to the caller,
never a silent success.

With ``countdown`` or ``eta`` the saga is recorded PENDING and a start message carries the
delay; a start message that is lost is replaced by the reconciler once its time has passed.
A start task's message sent by name from elsewhere (``send_task``) still starts the saga when a
worker takes it (the task id is the saga id, so a repeat starts nothing twice).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from celery import Task
from celery.result import AsyncResult

from sagas.definition import Saga
from sagas.runtime.binding import Binding
from sagas.runtime.transitions import record_pending_start, start_saga


class StartTask(Task):  # type: ignore[misc]
    """The base class ``Sagas.start_task`` gives a saga's start task."""

    saga_name: str = ""
    saga_version: int | None = None
    binding: Binding | None = None

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Start the saga now, in this process (see the module's docstring)."""
        binding = self._bound()
        data, idempotency_key = _call_args(args, kwargs)
        saga_id = task_id or str(uuid.uuid4())
        countdown, eta = options.get("countdown"), options.get("eta")
        if countdown or eta:
            not_before = _due(countdown, eta)
            started = record_pending_start(
                binding, self.saga_name, data, saga_id=saga_id, idempotency_key=idempotency_key,
                version=self.saga_version, not_before=not_before,
            )
            if started == saga_id:
                super().apply_async(
                    args=(data,), kwargs={"idempotency_key": idempotency_key},
                    task_id=saga_id, eta=not_before, queue=options.get("queue", self.queue),
                )
            return self.AsyncResult(started)
        started = start_saga(
            binding, self.saga_name, data, saga_id=saga_id, idempotency_key=idempotency_key,
            version=self.saga_version,
        )
        return self.AsyncResult(started)

    def run(self, data: Any, idempotency_key: str | None = None) -> str:
        """A start message (sent by name, or a delayed start): the task id is the saga id."""
        return start_saga(
            self._bound(), self.saga_name, data, saga_id=self.request.id,
            idempotency_key=idempotency_key, version=self.saga_version,
        )

    def _bound(self) -> Binding:
        if self.binding is None:  # pragma: no cover - set by make_start_task
            raise RuntimeError(f"start task {self.name!r} is not bound to a saga engine")
        return self.binding


def make_start_task(
    binding: Binding, saga: Saga, name: str | None = None, **options: Any
) -> StartTask:
    """Register ``saga``'s start task on the binding's app (on the saga queue by default)."""
    task_name = name or f"sagas.start.{saga.name}"
    attrs = {"saga_name": saga.name, "saga_version": options.pop("version", None),
             "binding": binding}
    base = type(f"Start_{saga.name}", (StartTask,), attrs)

    def start(self: StartTask, data: Any, idempotency_key: str | None = None) -> str:
        return StartTask.run(self, data, idempotency_key)

    start.__doc__ = f"Start a {saga.name!r} saga (``.delay(data)`` records it first)."
    options.setdefault("queue", binding.settings.saga_queue)
    options.setdefault("ignore_result", True)
    task: StartTask = binding.app.task(
        name=task_name, base=base, bind=True, shared=False, **options
    )(start)
    return task


def _call_args(args: Any, kwargs: Any) -> tuple[Any, str | None]:
    """``(data,)`` or ``data=``, and an optional ``idempotency_key`` (second or keyword)."""
    args = tuple(args or ())
    kwargs = dict(kwargs or {})
    data = args[0] if args else kwargs.pop("data", None)
    key = args[1] if len(args) > 1 else kwargs.pop("idempotency_key", None)
    return data, key


def _due(countdown: float | None, eta: datetime | None) -> datetime:
    if eta is not None:
        return eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)
    from datetime import timedelta

    return datetime.now(UTC) + timedelta(seconds=float(countdown or 0))

"""The worker's consumer, taught to dead-letter poison, not to log a traceback and drop it.

Celery's consumer (``celery.worker.consumer.Consumer``) already sorts what it cannot run:
``on_decode_error`` (a body its serializer cannot decode), ``on_unknown_message`` (no task
name), ``on_unknown_task`` (a name nobody registers) and ``on_invalid_task`` (a malformed
message, or a content type ``accept_content`` refuses, such as pickle). Each logs the message at
ERROR or CRITICAL with a traceback and drops it. The engine keeps those decisions and replaces
only the report: one line, a metric and a dead letter (``sagas.runtime.poison.refuse``).

It adds two checks of its own before a message becomes a task request, on the consumer's
event loop (they cost a ``len`` and a signature bind; the body is decoded there anyway): a body
over ``SAGAS_MAX_MESSAGE_BYTES``, and a body that is not ``[args, kwargs, embed]`` or whose
arguments do not fit the task's signature.

``Sagas(app)`` installs it at ``worker_init`` by subclassing whatever consumer class the worker
was given (``worker_consumer``), so an app's own consumer keeps working.
"""

from __future__ import annotations

import json
from typing import Any

from celery import signals
from celery.exceptions import NotRegistered
from celery.utils.log import get_logger
from celery.utils.objects import Bunch
from kombu.exceptions import ContentDisallowed
from vine import promise  # type: ignore[import-untyped]

from sagas.runtime import revoke
from sagas.runtime.binding import binding_of
from sagas.runtime.poison import PoisonReason, refuse
from sagas.store.dead_letters import DeadLetter

logger = get_logger(__name__)

POISON_AWARE = "__sagas_poison_aware__"


def poison_aware(consumer_cls: type) -> type:
    """``consumer_cls`` with the engine's poison handling first in its MRO (idempotent)."""
    if getattr(consumer_cls, POISON_AWARE, False):
        return consumer_cls
    return type(consumer_cls.__name__, (PoisonAwareConsumer, consumer_cls),
                {"__module__": consumer_cls.__module__, POISON_AWARE: True})


class PoisonAwareConsumer:
    """Mixin over Celery's ``Consumer``: the refusals and the two extra checks."""

    app: Any
    connection_errors: Any
    event_dispatcher: Any
    hostname: str

    # --- the connection -----------------------------------------------------------------------
    def connect(self) -> Any:
        """Celery's connect, remembered: revokes broadcast before it never reached this worker
        (``sagas.runtime.revoke``)."""
        conn = super().connect()  # type: ignore[misc]
        revoke.connected()
        return conn

    # --- Celery's four refusals -------------------------------------------------------------
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._refuse(message, PoisonReason.UNDECODABLE, f"cannot decode the body: {_line(exc)}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._refuse(message, PoisonReason.MALFORMED, "not a task message (no task name)")
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = _headers(message)
        name, task_id = headers.get("task"), headers.get("id")
        self._refuse(message, PoisonReason.UNKNOWN_TASK,
                     f"task {name!r} is not registered in this worker")
        if isinstance(name, str) and isinstance(task_id, str):
            # As Celery does: a client waiting on the result learns it, and Flower shows it.
            request = Bunch(name=name, chord=None, root_id=headers.get("root_id"),
                            correlation_id=message.properties.get("correlation_id"),
                            reply_to=message.properties.get("reply_to"), errbacks=None)
            try:
                self.app.backend.mark_as_failure(task_id, NotRegistered(name), request=request)
            except Exception as error:
                logger.debug("could not store the failure of %s: %s", task_id, error)
            if self.event_dispatcher:
                self.event_dispatcher.send("task-failed", uuid=task_id,
                                           exception=f"NotRegistered({name!r})")
            signals.task_unknown.send(sender=self, message=message, exc=exc, name=name,
                                      id=task_id)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            self._refuse(message, PoisonReason.UNDECODABLE,
                         f"content type refused (accept_content): {_line(exc)}")
        else:
            self._refuse(message, PoisonReason.MALFORMED, f"invalid task message: {_line(exc)}")
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    # --- the engine's own checks ------------------------------------------------------------
    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)  # type: ignore[misc]
        binding = binding_of(self.app)
        limit = binding.settings.sagas_max_message_bytes if binding is not None else 0
        tasks = self.app.tasks

        def on_task_received(message: Any) -> Any:
            size = len(message.body or b"")
            if limit and size > limit:
                return self._refuse(message, PoisonReason.TOO_LARGE,
                                    f"the body is {size} bytes, over SAGAS_MAX_MESSAGE_BYTES "
                                    f"({limit}); not decoded")
            name = _headers(message).get("task")
            task = tasks.get(name) if isinstance(name, str) else None
            if task is not None:
                problem = _misfit(task, message)
                if problem is not None:
                    return self._refuse(message, PoisonReason.MALFORMED, problem)
            return handle(message)

        return on_task_received

    def _refuse(self, message: Any, reason: PoisonReason, detail: str) -> None:
        headers = _headers(message)
        info = getattr(message, "delivery_info", None) or {}
        body = message.body
        refuse(binding_of(self.app), DeadLetter(
            reason=str(reason), detail=detail, queue=_text(info.get("routing_key")),
            task=_text(headers.get("task")), task_id=_text(headers.get("id")),
            saga_id=_saga_of(headers), size=len(body or b""),
            content_type=_text(getattr(message, "content_type", None)),
            headers=_jsonable(headers), body=body, worker=self.hostname,
        ))
        message.reject_log_error(logger, self.connection_errors)


def _misfit(task: Any, message: Any) -> str | None:
    """Why a message for ``task`` cannot be called, or None (Celery's own errors go on)."""
    try:
        payload = message.payload  # decoded once; kombu keeps it for the strategy
    except Exception:
        return None  # Celery's handler reports it (on_decode_error / on_invalid_task)
    if isinstance(payload, dict) and "args" in payload:
        return None  # protocol 1 or hybrid: Celery converts it
    if not (isinstance(payload, list | tuple) and len(payload) == 3
            and isinstance(payload[0], list | tuple) and isinstance(payload[1], dict)
            and (payload[2] is None or isinstance(payload[2], dict))):
        return f"the body is not [args, kwargs, embed] (task {task.name})"
    header = getattr(task, "__header__", None)
    if getattr(task, "typing", True) and callable(header):
        try:
            header(*payload[0], **payload[1])
        except TypeError as exc:
            return f"the arguments do not fit task {task.name}: {exc}"
    return None


def _headers(message: Any) -> dict[str, Any]:
    headers = getattr(message, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _saga_of(headers: dict[str, Any]) -> str | None:
    """The saga id at the head of a step's task id (``<saga id>.<step>.<do|undo>.<attempt>``)."""
    task_id = headers.get("id")
    if isinstance(task_id, str) and task_id.count(".") >= 3:
        saga_id, _, phase, attempt = task_id.rsplit(".", 3)
        if phase in ("do", "undo") and attempt.isdigit():
            return saga_id
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) or value is None else repr(value)


def _jsonable(headers: dict[str, Any]) -> dict[str, Any]:
    """Headers as any store's JSON column takes them (no NaN, no NUL)."""
    try:
        text = json.dumps(headers, default=repr, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return {"repr": repr(headers)[:4000].replace("\x00", "\\x00")}
    out = json.loads(text.replace("\\u0000", "\\\\x00"))
    return out if isinstance(out, dict) else {}


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__

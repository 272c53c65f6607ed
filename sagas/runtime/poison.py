"""Poison messages: what a worker refuses, and how a refusal looks to an operator.

Every refusal does the same three things, whichever process met the message (the worker's
consumer for what cannot even become a task, a pool process for a step message it must not
run): one log line naming the reason, the queue, the task and where the dead letter is; one
``sagas_poison_messages_total{reason}`` count; and one row in the dead-letter table, which
``sagas dead`` lists. The message itself is acked: it cannot block its queue or come back.

The step wrapper's side lives here too: a step message of a saga, version or step this worker
does not have is refused before the participant runs, and a step result that cannot be stored
(not JSON, or over ``SAGAS_MAX_MESSAGE_BYTES``) is handled without losing the step.
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore

from sagas.coordinator import ACTION, IgnoreKind, StepFailed
from sagas.definition import Saga, Step
from sagas.errors import InvalidSagaInputError
from sagas.observe.listeners import MessageRefused, message_refused, refused_event
from sagas.runtime.binding import Binding, binding_of
from sagas.runtime.message import StepContext
from sagas.runtime.transitions import apply_event
from sagas.settings import SagaSettings
from sagas.store.dead_letters import DeadLetter, record

log = logging.getLogger("sagas.poison")


class PoisonReason(StrEnum):
    """Why a message was refused: the dead letter's ``reason`` and the metric's label."""

    UNDECODABLE = "undecodable"  # not JSON, a bad encoding, or a refused content type (pickle)
    MALFORMED = "malformed"  # decodes, but is not a task or step message of the right shape
    UNKNOWN_TASK = "unknown_task"  # a task name this worker does not register
    UNKNOWN_SAGA = "unknown_saga"  # a step message of a saga neither known here nor stored
    UNKNOWN_VERSION = "unknown_version"  # a step of a saga version this worker does not have
    UNKNOWN_STEP = "unknown_step"  # a step message naming a step its saga does not have
    TOO_LARGE = "too_large"  # a body over SAGAS_MAX_MESSAGE_BYTES
    UNSERIALIZABLE_RESULT = "unserializable_result"  # a step returned what cannot be stored


def refuse(binding: Binding | None, letter: DeadLetter, *, text: str | None = None,
           level: int = logging.ERROR) -> int | None:
    """Dead-letter ``letter``, count it and log one line; never raises. Returns the row's id.

    ``text`` replaces the line's description (``letter.detail`` by default); the line always
    ends with where the dead letter is, or why it could not be kept.
    """
    letter_id: int | None = None
    kept = "not dead-lettered: this app has no saga engine"
    if binding is not None:
        try:
            letter_id = record(binding.store, letter)
            kept = f"dead letter {letter_id} (sagas dead show {letter_id})"
        except Exception as exc:  # the store is down: the message is still refused
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            kept = f"not dead-lettered: {first}"
    message_refused(MessageRefused(letter.reason, letter.queue, letter.task, letter_id))
    where = ", ".join(x for x in (
        f"queue {letter.queue}" if letter.queue else "",
        f"task {letter.task}" if letter.task else "",
        f"id {letter.task_id}" if letter.task_id else "", f"{letter.size} bytes",
    ) if x)
    log.log(level, "poison message refused (%s): %s [%s]; %s", letter.reason,
            text or letter.detail, where, kept)
    return letter_id


def check_input_size(settings: SagaSettings, data: Any) -> None:
    """Refuse a saga input whose step messages would be refused as too large."""
    limit = settings.sagas_max_message_bytes
    if not limit:
        return
    try:
        size = len(json.dumps(data, default=str))
    except (TypeError, ValueError, RecursionError):
        return  # the input model (or the store) says what is wrong with it
    if size > limit:
        raise InvalidSagaInputError(
            f"the saga input is {size} bytes as JSON, over SAGAS_MAX_MESSAGE_BYTES ({limit}): "
            "every step message carries it"
        )


# --- the step wrapper's refusals -----------------------------------------------------------
def _letter(task: Task, reason: PoisonReason, detail: str, body: Any,
            ctx: StepContext | None = None) -> DeadLetter:
    request = task.request  # Celery's; sagas.testing's stand-in has fewer fields
    info = getattr(request, "delivery_info", None) or {}
    try:
        text = json.dumps(body, default=repr)
    except Exception:
        text = repr(body)
    return DeadLetter(
        reason=str(reason), detail=detail, queue=info.get("routing_key"),
        task=getattr(task, "name", None), task_id=getattr(request, "id", None),
        saga_id=ctx.saga_id if ctx else None, step=ctx.step if ctx else None, size=len(text),
        content_type="application/json", body=text, worker=getattr(request, "hostname", None),
    )


def refuse_malformed_step(task: Task, args: tuple[Any, ...], exc: Exception) -> NoReturn:
    """A message shaped like a step message whose fields are wrong: run nothing, raise Ignore."""
    errors = getattr(exc, "errors", None)
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors()
    ) if callable(errors) else str(exc)
    refuse(_binding(task), _letter(task, PoisonReason.MALFORMED,
                                   f"not a valid step message: {detail}", list(args)))
    raise Ignore()


def refuse_unknown_step(binding: Binding, task: Task, ctx: StepContext, saga: Saga | None
                        ) -> None:
    """The wrapper's check before a participant runs: raises Ignore for a step it must not run.

    Returns when the step may run: its saga, version and step are known here, or the saga is
    unknown to this process but recorded in the store (its definition lives in another deploy
    of the app, and the coordinator decides for it).
    """
    if saga is not None:
        if ctx.step in saga.steps:
            return
        reason = PoisonReason.UNKNOWN_STEP
        detail = (f"saga {ctx.saga_id}: saga {ctx.saga!r} v{ctx.version} has no step "
                  f"{ctx.step!r}; nothing was run")
        refuse(binding, _letter(task, reason, detail, ctx.model_dump(mode="json"), ctx))
        raise Ignore()
    if ctx.saga in binding.versions:
        # The saga is ours but not this version (the code moved on): run nothing, change
        # nothing; a worker that has the version, or recovery re-driving there, takes it.
        detail = (f"saga {ctx.saga_id}: step {ctx.step} ({ctx.phase}) not run: this worker has "
                  f"no version {ctx.version} of saga {ctx.saga!r}; a worker that registers it "
                  "(or recovery) takes the saga over")
        refused_event(ctx.saga_id, ctx.saga, ctx.version, IgnoreKind.UNKNOWN_VERSION)
        refuse(binding, _letter(task, PoisonReason.UNKNOWN_VERSION, detail,
                                ctx.model_dump(mode="json"), ctx),
               text=detail, level=logging.WARNING)
        raise Ignore()
    try:
        stored = ctx.saga_id in binding.store.saga_states([ctx.saga_id])
    except Exception as exc:  # cannot tell: run it as before, the coordinator decides
        log.debug("saga %s: store unavailable for the unknown-saga check: %s", ctx.saga_id, exc)
        return
    if stored:
        return
    detail = (f"saga {ctx.saga_id}: no saga {ctx.saga!r} is registered here and no such saga "
              f"is recorded; step {ctx.step} ({ctx.phase}) was not run")
    refuse(binding, _letter(task, PoisonReason.UNKNOWN_SAGA, detail,
                            ctx.model_dump(mode="json"), ctx))
    raise Ignore()


UNSERIALIZABLE = "unserializable_result"
"""The key of the stand-in stored for a result that could not be (see ``storable_result``)."""


def storable_result(binding: Binding, task: Task, ctx: StepContext, step: Step | None,
                    result: Any) -> Any:
    """``result`` when the store can keep it (JSON, within the size limit), else a decision.

    The step's effect happened (its participant returned), so the step is never left RUNNING
    nor lost. An action before the pivot can still be undone: it fails as outcome-unknown,
    recorded here and now, and the saga compensates it with the others. The pivot, a step
    after it and a compensation can only go forward: the step is recorded as it ended, with a
    stand-in result ``{"unserializable_result": "<type>: <repr>"}``. Either way the result's
    repr is dead-lettered.
    """
    limit = binding.settings.sagas_max_message_bytes
    try:
        encoded = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = f"not JSON-serialisable ({type(exc).__name__}: {exc})"
    else:
        if not limit or len(encoded) <= limit:
            return result
        problem = f"{len(encoded)} bytes as JSON, over SAGAS_MAX_MESSAGE_BYTES ({limit})"
    shown = _short_repr(result)
    undo = ctx.phase == ACTION and not ctx.after_pivot and step is not None and not step.pivot
    outcome = ("the step fails and is compensated with the saga" if undo else
               "the step is recorded with a stand-in result (the saga only goes forward)")
    detail = f"saga {ctx.saga_id}: step {ctx.step} ({ctx.phase}) returned a result {problem}; " \
             f"{outcome}"
    refuse(binding, _letter(task, PoisonReason.UNSERIALIZABLE_RESULT, detail,
                            {"context": ctx.model_dump(mode="json"), "result": shown}, ctx))
    if undo:
        apply_event(binding, ctx.saga_id, StepFailed(
            ctx.step, ctx.phase, f"UnserializableResult: the step's result is {problem}",
            definite=False,
        ))
        raise Ignore()
    return {UNSERIALIZABLE: shown}


def _short_repr(value: Any, size: int = 1024) -> str:
    try:
        text = f"{type(value).__name__}: {value!r}"
    except Exception as exc:
        text = f"{type(value).__name__}: (repr failed: {exc})"
    return text if len(text) <= size else text[:size] + "..."


def _binding(task: Task) -> Binding | None:
    return binding_of(task.app)

"""The step message: the single argument every step and compensation task receives.

``StepContext`` owns it both ways: ``StepContext.build`` writes the dict a step task is sent
with, and ``StepContext.from_args`` recognises one in a task's arguments. Nothing else in the
engine builds or inspects those keys.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

Phase = Literal["action", "compensation"]

_REQUIRED = frozenset({"saga_id", "saga", "step", "phase", "idempotency_key"})


class StepContext(BaseModel):
    """What a participant needs: its idempotency key, the saga input, earlier steps' results."""

    model_config = ConfigDict(extra="allow", frozen=True)

    saga_id: str
    saga: str
    step: str
    phase: Phase
    idempotency_key: str
    attempt: int = 1
    version: int = 1  # the saga definition's version this instance runs on
    after_pivot: bool = False
    inline: bool = False
    sent: float = 0.0  # when it was dispatched (epoch seconds; see sagas.runtime.revoke)
    input: dict[str, Any] = Field(default_factory=dict)
    results: dict[str, Any] = Field(default_factory=dict)
    locks: list[str] = Field(default_factory=list)  # the semantic locks its saga holds

    @staticmethod
    def build(
        *,
        saga_id: str,
        saga: str,
        step: str,
        phase: Phase,
        attempt: int,
        version: int,
        after_pivot: bool,
        inline: bool,
        input: dict[str, Any],
        results: dict[str, Any],
        sent: float = 0.0,
        locks: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The message body (a plain JSON object: what Celery serialises and Flower shows)."""
        return {
            "saga_id": saga_id, "saga": saga, "step": step, "phase": phase, "attempt": attempt,
            "version": version,
            "idempotency_key": idempotency_key(saga_id, step), "after_pivot": after_pivot,
            "inline": inline, "sent": sent, "input": input, "results": results,
            **({"locks": list(locks)} if locks else {}),
        }

    @classmethod
    def from_args(cls, args: Any, kwargs: Any = None) -> StepContext | None:
        """The context when a task call is a saga step, else None (a plain call of the task)."""
        if kwargs or not isinstance(args, list | tuple) or len(args) != 1:
            return None
        body = args[0]
        if not isinstance(body, dict) or not body.keys() >= _REQUIRED:
            return None
        return cls.model_validate(body)


class StepHeader(NamedTuple):
    """Who a step message is for, read without validating the whole context (attempt hooks)."""

    saga_id: str
    saga: str
    step: str
    phase: str
    attempt: int


def peek(args: Any, kwargs: Any = None) -> StepHeader | None:
    """The header of a step message, or None for any other call (or a malformed message,
    which the step wrapper refuses): a few dict lookups, where ``from_args`` validates it all."""
    if kwargs or not isinstance(args, list | tuple) or len(args) != 1:
        return None
    body = args[0]
    if not isinstance(body, dict):
        return None
    saga_id, saga, step, phase = (body.get(k) for k in ("saga_id", "saga", "step", "phase"))
    attempt = body.get("attempt", 1)
    if not (isinstance(saga_id, str) and isinstance(saga, str) and isinstance(step, str)
            and phase in ("action", "compensation") and "idempotency_key" in body
            and isinstance(attempt, int) and not isinstance(attempt, bool)):
        return None
    return StepHeader(saga_id, saga, step, phase, attempt)


def idempotency_key(saga_id: str, step: str) -> str:
    """One key per saga and step, the same for every attempt and every re-drive."""
    return f"{saga_id}:{step}"


def step_task_id(saga_id: str, step: str, phase: str, attempt: int) -> str:
    """Readable task ids: searching a saga id in Flower finds all of its tasks."""
    return f"{saga_id}.{step}.{'do' if phase == 'action' else 'undo'}.{attempt}"

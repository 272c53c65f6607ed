"""How a saga is declared: a named graph of steps, validated when it is defined."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ValidationError

from sagas.errors import (
    BusinessError,
    CompensationAfterPivotError,
    CycleError,
    DefinitionError,
    DuplicateStepError,
    InvalidSagaInputError,
    UnknownDependencyError,
)

DEFAULT_QUEUE = "saga"


MAX_LOCK_KEY = 200
"""Longest semantic lock key (``saga_locks.key``)."""


class LockPolicy(StrEnum):
    """What a start does when a key its saga needs is held by another saga."""

    WAIT = "wait"  # recorded WAITING; runs in arrival order when the key frees
    REJECT = "reject"  # refused at once with SagaLockedError naming the key and its holder


class SuccessShape(StrEnum):
    """What a step's success decides by the graph alone (see ``Saga.success_shape``)."""

    ADVANCE = "advance"  # its children become ready
    COMPLETE = "complete"  # the saga completes

_PREVIOUS = object()  # sentinel: "depends on the step declared before me"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; business errors are never retried."""

    attempts: int = 3
    backoff: float = 0.2
    backoff_max: float = 30.0
    jitter: bool = True
    transient: tuple[type[BaseException], ...] = (Exception,)
    business: tuple[type[BaseException], ...] = (BusinessError,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise DefinitionError("RetryPolicy.attempts must be at least 1")

    def is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, self.business):
            return False
        return isinstance(exc, self.transient)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (attempt counts from 1)."""
        ceiling = min(self.backoff_max, self.backoff * (2 ** max(0, attempt - 1)))
        return random.uniform(0, ceiling) if self.jitter else ceiling


def task_name(task: Any) -> str:
    """Accept a Celery task object or a bare task name (a participant in another codebase)."""
    if isinstance(task, str):
        return task
    name = getattr(task, "name", None)
    if not isinstance(name, str):
        raise DefinitionError(f"{task!r} is neither a Celery task nor a task name")
    return name


DEFAULT_FORWARD_RETRIES = 10


@dataclass(frozen=True)
class Step:
    """One step of a saga: its action, its compensation, where and how it runs.

    ``time_limit`` (seconds) is the action's Celery ``soft_time_limit``; Celery kills the
    delivery ``TIME_LIMIT_HARD_MARGIN`` (5 s) later. A step that made no progress is re-driven
    by recovery only once that hard limit plus ``RECOVERY_GRACE`` has passed since it was sent,
    so a delivery still running is never doubled. **Without a time limit nothing bounds a
    delivery**: a step whose worker died waits ``STEP_TIMEOUT`` (default 300 s) before recovery
    re-drives it, and its saga shows as stalled (``sagas show``) only once that has passed.
    Give every step whose normal run time you know a ``time_limit``.

    ``forward_retries``: after the pivot a step can only go forward. When it fails (its
    ``retry`` policy's attempts spent), it is sent again, one attempt at a time with the
    policy's backoff, at most this many times; then, or at once on a business refusal, the saga
    parks as FORWARD_FAILED until an operator's ``sagas retry`` sends it again (with a fresh
    budget).
    """

    name: str
    action: Any
    compensation: Any = None
    queue: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=5))
    time_limit: float | None = None
    pivot: bool = False
    depends_on: Any = _PREVIOUS
    forward_retries: int = DEFAULT_FORWARD_RETRIES

    def __post_init__(self) -> None:
        if not isinstance(self.forward_retries, int) or self.forward_retries < 0:
            raise DefinitionError(f"step {self.name!r}: forward_retries must be 0 or more")

    @property
    def action_name(self) -> str:
        return task_name(self.action)

    @property
    def compensation_name(self) -> str | None:
        return None if self.compensation is None else task_name(self.compensation)

    @property
    def target_queue(self) -> str:
        if self.queue:
            return self.queue
        options = getattr(self.action, "queue", None)
        return options if isinstance(options, str) else DEFAULT_QUEUE


class Saga:
    """An immutable, validated saga graph; ``Sagas.register`` makes an engine run it."""

    def __init__(
        self,
        name: str,
        steps: Sequence[Step],
        *,
        input_model: type[BaseModel] | None = None,
        deadline: float | None = None,
        version: int = 1,
        locks: Callable[[Any], Iterable[str]] | None = None,
        on_locked: LockPolicy | str = "wait",
    ) -> None:
        if not name:
            raise DefinitionError("a saga needs a name")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DefinitionError(f"saga {name!r}: version must be a whole number >= 1")
        self.name = name
        self.version = version
        self.input_model = input_model
        self.deadline = deadline
        self.locks = locks
        try:
            self.on_locked = LockPolicy(on_locked)
        except ValueError:
            raise DefinitionError(
                f"saga {name!r}: on_locked must be one of "
                f"{', '.join(p.value for p in LockPolicy)}, not {on_locked!r}"
            ) from None
        self.steps: dict[str, Step] = {}
        self.parents: dict[str, tuple[str, ...]] = {}
        previous: str | None = None
        for step in steps:
            if not step.name or not isinstance(step.name, str):
                raise DefinitionError(f"saga {name!r}: every step needs a name")
            if step.name in self.steps:
                raise DuplicateStepError(f"saga {name!r}: duplicate step name {step.name!r}")
            task_name(step.action)
            if step.compensation is not None:
                task_name(step.compensation)
            if step.depends_on is _PREVIOUS:
                deps: tuple[str, ...] = (previous,) if previous else ()
            elif isinstance(step.depends_on, str):
                deps = (step.depends_on,)
            else:
                deps = tuple(dict.fromkeys(step.depends_on or ()))  # a repeated name is one edge
            self.steps[step.name] = step
            self.parents[step.name] = deps
            previous = step.name
        if not self.steps:
            raise DefinitionError(f"saga {name!r} has no steps")
        for step_name, deps in self.parents.items():
            for dep in deps:
                if dep not in self.steps:
                    raise UnknownDependencyError(
                        f"saga {name!r}: step {step_name!r} depends on unknown step {dep!r}"
                    )
        self.children: dict[str, tuple[str, ...]] = {
            s: tuple(c for c in self.steps if s in self.parents[c]) for s in self.steps
        }
        self.order: tuple[str, ...] = self._topological_order()
        pivots = [s.name for s in self.steps.values() if s.pivot]
        if len(pivots) > 1:
            raise DefinitionError(f"saga {name!r}: more than one pivot step: {pivots}")
        self.pivot: str | None = pivots[0] if pivots else None
        self.after_pivot: frozenset[str] = (
            frozenset(self.descendants(self.pivot)) if self.pivot else frozenset()
        )
        for step_name in self.order:
            if step_name in self.after_pivot and self.steps[step_name].compensation is not None:
                raise CompensationAfterPivotError(
                    f"saga {name!r}: step {step_name!r} comes after the pivot {self.pivot!r} "
                    "and declares a compensation, which could never run"
                )
        self.success_shape: dict[str, SuccessShape | None] = {
            s: self._success_shape(s) for s in self.order
        }

    # --- graph ---------------------------------------------------------------
    def _topological_order(self) -> tuple[str, ...]:
        indegree = {s: len(p) for s, p in self.parents.items()}
        ready = [s for s in self.steps if indegree[s] == 0]
        order: list[str] = []
        while ready:
            current = ready.pop(0)
            order.append(current)
            for child in self.children[current]:
                indegree[child] -= 1
                if indegree[child] == 0:
                    ready.append(child)
        if len(order) != len(self.steps):
            stuck = [s for s in self.steps if s not in order]
            raise CycleError(f"saga {self.name!r}: cycle through steps {stuck}")
        return tuple(order)

    def ancestors(self, step: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.parents[step])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.parents[current])
        return seen

    def _success_shape(self, step: str) -> SuccessShape | None:
        """What a success of ``step`` decides while the saga runs, if the graph alone says it.

        ADVANCE: every child waits only on this step or its ancestors (all of which succeeded
        before it was sent), so exactly its children become ready. COMPLETE: every other step is
        an ancestor, so the saga is done. Otherwise (a join with another branch, one of several
        ends) the decision needs the other steps' states: None.
        """
        before = self.ancestors(step) | {step}
        children = self.children[step]
        if children:
            if all(set(self.parents[c]) <= before for c in children):
                return SuccessShape.ADVANCE
            return None
        return SuccessShape.COMPLETE if len(before) == len(self.steps) else None

    def descendants(self, step: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self.children[step])
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.children[current])
        return seen

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(s for s in self.order if not self.parents[s])

    def task_names(self) -> set[str]:
        names = {s.action_name for s in self.steps.values()}
        names |= {s.compensation_name for s in self.steps.values() if s.compensation_name}
        return names

    def unknown_tasks(self, known: Iterable[str]) -> list[str]:
        """Task names no worker registry in ``known`` has: reported, never silently dropped."""
        known_set = set(known)
        return sorted(n for n in self.task_names() if n not in known_set)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the graph: steps, dependencies, task names, pivot and queues.

        Two definitions with one fingerprint decide every event alike; a changed graph under the
        same version number shows as a different fingerprint (see ``Sagas`` at worker start).
        """
        shape = [
            [name, list(self.parents[name]), self.steps[name].action_name,
             self.steps[name].compensation_name, self.steps[name].pivot,
             self.steps[name].target_queue]
            for name in self.order
        ]
        canonical = json.dumps(shape, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # --- semantic locks ------------------------------------------------------
    def lock_keys(self, payload: Mapping[str, Any]) -> tuple[str, ...]:
        """The keys an instance with this (validated) input holds, sorted: the order every
        saga takes them in, so two sagas never wait on each other's keys.

        ``locks`` gets the input model's instance when the saga declares one (so
        ``lambda o: [f"customer:{o.customer_id}"]`` works), else the input dict.
        """
        if self.locks is None:
            return ()
        value: Any = payload
        if self.input_model is not None:
            value = self.input_model.model_validate(payload)
        try:
            keys = list(self.locks(value))
        except Exception as exc:
            raise InvalidSagaInputError(
                f"saga {self.name!r}: its locks could not be computed from this input: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for key in keys:
            if not isinstance(key, str) or not key or len(key) > MAX_LOCK_KEY:
                raise InvalidSagaInputError(
                    f"saga {self.name!r}: a lock key must be a non-empty string of at most "
                    f"{MAX_LOCK_KEY} characters, got {key!r}"
                )
        return tuple(sorted(set(keys)))

    # --- input ---------------------------------------------------------------
    def validate_input(self, data: Any) -> dict[str, Any]:
        if self.input_model is not None:
            try:
                if isinstance(data, BaseModel):
                    data = data.model_dump(mode="json")
                return self.input_model.model_validate(data).model_dump(mode="json")
            except ValidationError as exc:
                raise InvalidSagaInputError(
                    f"saga {self.name!r}: invalid input: {_format_validation(exc)}"
                ) from exc
        if not isinstance(data, Mapping):
            raise InvalidSagaInputError(
                f"saga {self.name!r}: input must be a JSON object, got {type(data).__name__}"
            )
        return dict(data)

    # --- rendering -----------------------------------------------------------
    def render_text(self) -> str:
        lines = [f"saga {self.name} v{self.version} ({self.fingerprint})"]
        for name in self.order:
            step = self.steps[name]
            deps = ", ".join(self.parents[name]) or "(start)"
            comp = step.compensation_name or "-"
            flags = " [pivot]" if step.pivot else ""
            lines.append(
                f"  {name}{flags}: {step.action_name} on {step.target_queue}; "
                f"compensation {comp}; after {deps}"
            )
        return "\n".join(lines)

    def render_mermaid(self) -> str:
        lines = ["flowchart LR"]
        for name in self.order:
            step = self.steps[name]
            label = f"{name}<br/>{step.action_name}"
            shape = f'{name}{{{{"{label}"}}}}' if step.pivot else f'{name}["{label}"]'
            lines.append(f"    {shape}")
        for name in self.order:
            for parent in self.parents[name]:
                lines.append(f"    {parent} --> {name}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, v{self.version}, steps={list(self.order)!r})"


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)

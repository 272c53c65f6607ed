"""Listeners: one hook interface that sees every saga and step transition after it committed.

A listener subclasses ``SagaListener`` and overrides the hooks it cares about (the rest are
no-ops, like a dramatiq middleware). Transition hooks run in whatever process recorded the
transition (a step's worker, the coordinator, the web app), right after the commit and before the
steps that became ready are published, so keep them quick. Attempt hooks run in the worker around
the step's own code. A listener that raises is logged and never breaks the saga.

Built-ins, chosen by ``SAGAS_LISTENERS`` (default ``metrics``): ``metrics`` (Prometheus),
``json_log`` (one JSON line per transition on the ``sagas.transitions`` logger), ``tracing``
(OpenTelemetry; added by itself when an ``OTEL_TRACES_EXPORTER`` is set). Dotted paths
(``pkg.module:Class``) name your own; ``register()`` adds one from code.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_retry,
    worker_process_init,
)

from sagas.runtime.message import peek

log = logging.getLogger("sagas.listeners")

_IN_FLIGHT = frozenset({"RUNNING", "COMPENSATING"})


# --- what listeners receive --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TransitionEvent:
    """One committed transition of a saga (``step is None``) or of one of its steps."""

    saga_id: str
    saga: str
    step: str | None
    from_state: str | None
    to_state: str
    attempt: int
    error: str | None
    duration: float | None  # the attempt's (step) or the saga's (settled saga), when known
    cause: str  # the event that caused it: Started, StepSucceeded, Redrive, ...
    saga_state: str  # the saga's state after the whole decision
    at: float  # wall clock (time.time()) when listeners were told


@dataclass(frozen=True, slots=True)
class RefusedEvent:
    """An event this process would not decide, and why (an ``IgnoreKind`` value)."""

    saga_id: str
    saga: str
    version: int
    reason: str


@dataclass(frozen=True, slots=True)
class MessageRefused:
    """A message a worker refused as poison (dead-lettered), and why (a ``PoisonReason``)."""

    reason: str
    queue: str | None
    task: str | None
    dead_letter_id: int | None  # None when the store could not keep it


@dataclass(slots=True)
class StepAttempt:
    """One run of a step's action or compensation in this worker process."""

    saga_id: str
    saga: str
    step: str
    phase: str  # "action" or "compensation"
    attempt: int
    task_id: str
    task: Any  # the Celery task; ``task.request`` carries the message headers
    started: float = field(default_factory=time.time)
    finished: float | None = None
    outcome: str | None = None  # "succeeded", "retry" or "failed"
    error: BaseException | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # listeners' own per-attempt state

    @property
    def duration(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


class SagaListener:
    """Base class of no-op hooks; override what you need. Hooks must not block for long."""

    def on_saga_transition(self, event: TransitionEvent) -> None:
        """The saga itself changed state (committed)."""

    def on_step_transition(self, event: TransitionEvent) -> None:
        """A step changed state, or started another attempt (committed)."""

    def on_event_refused(self, event: RefusedEvent) -> None:
        """This process refused to decide an event (it lacks the version): nothing changed."""

    def on_message_refused(self, event: MessageRefused) -> None:
        """A worker refused a message as poison and dead-lettered it (``sagas dead``)."""

    def before_attempt(self, attempt: StepAttempt) -> None:
        """In the worker, just before a step's action or compensation runs."""

    def after_attempt(self, attempt: StepAttempt) -> None:
        """In the worker, after it ran; ``outcome`` and ``error`` say how it went."""


class JsonLogListener(SagaListener):
    """One JSON line per transition: greppable, and parsed as-is by log shippers."""

    def __init__(
        self, logger: logging.Logger | None = None, *, stream: IO[str] | None = None
    ) -> None:
        self.logger = logger or logging.getLogger("sagas.transitions")
        if stream is not None:
            # Lines of their own, not inside Celery's "[time: INFO/ForkPoolWorker-1] ..." format:
            # each line on ``stream`` is one JSON object, as log shippers parse it.
            if not any(getattr(h, "_sagas_json", False) for h in self.logger.handlers):
                handler = logging.StreamHandler(stream)
                handler.setFormatter(logging.Formatter("%(message)s"))
                handler._sagas_json = True  # type: ignore[attr-defined]
                self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self.logger.propagate = False

    def _emit(self, event: TransitionEvent) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        self.logger.info(json.dumps({
            "ts": datetime.fromtimestamp(event.at, UTC).isoformat(),
            "saga_id": event.saga_id, "saga": event.saga, "step": event.step,
            "from": event.from_state, "to": event.to_state, "attempt": event.attempt,
            "duration": None if event.duration is None else round(event.duration, 6),
            "error": event.error, "cause": event.cause, "saga_state": event.saga_state,
        }, separators=(",", ":")))

    on_saga_transition = _emit
    on_step_transition = _emit


# --- registry ----------------------------------------------------------------------------
_registered: list[SagaListener] = []
_active: tuple[SagaListener, ...] | None = None  # None: not configured yet in this process
_attempt_hooks = False
_lock = threading.RLock()
_current_attempt: ContextVar[StepAttempt | None] = ContextVar("sagas_attempt", default=None)


def _overrides(listener: SagaListener, *hooks: str) -> bool:
    return any(getattr(type(listener), h) is not getattr(SagaListener, h) for h in hooks)


Builder = Callable[[], Iterable[SagaListener]]
_builders: dict[str, Builder] = {}


def configure(builder: Builder | None = None, *, key: str = "default") -> tuple[SagaListener, ...]:
    """Build this process's listeners (idempotent); returns the active ones.

    Each bound engine gives a ``builder`` (see ``sagas.observe.setup``) under its own ``key``;
    the active listeners are all of theirs (one of each kind) plus those registered from code.
    The builders run again in each forked worker process, so exporters and threads belong to
    the process that uses them.
    """
    global _active
    with _lock:
        if builder is not None:
            _builders[key] = builder
        elif _active is not None:
            return _active
        built: list[SagaListener] = []
        for name, make in _builders.items():
            try:
                built += [b for b in make() if not any(type(x) is type(b) for x in built)]
            except Exception:
                log.exception("listeners of %s could not be set up; they are left out", name)
        # A built-in already registered from code (tracing.enable) is not built twice.
        built = [b for b in built if not any(type(r) is type(b) for r in _registered)]
        _active = (*built, *_registered)
        _wire_attempt_hooks()
        return _active


def register(listener: SagaListener) -> SagaListener:
    """Add a listener in this process (e.g. at import of your tasks module)."""
    with _lock:
        active = _active if _active is not None else configure()
        _registered.append(listener)
        _set_active((*active, listener))
    return listener


def ensure(kind: type[SagaListener], factory: Any = None) -> None:
    """Make sure one listener of ``kind`` is active (built-ins switched on from code)."""
    with _lock:
        if not any(isinstance(x, kind) for x in active()):
            register((factory or kind)())


def discard(kind: type[SagaListener]) -> None:
    """Remove every active listener of ``kind``."""
    with _lock:
        _registered[:] = [x for x in _registered if not isinstance(x, kind)]
        if _active is not None:
            _set_active(tuple(x for x in _active if not isinstance(x, kind)))


def unregister(listener: SagaListener) -> None:
    with _lock:
        if listener in _registered:
            _registered.remove(listener)
        if _active is not None:
            _set_active(tuple(x for x in _active if x is not listener))


def active() -> tuple[SagaListener, ...]:
    return _active if _active is not None else configure()


def reset(listeners: Iterable[SagaListener] = ()) -> None:
    """Replace every listener (tests, or an app that wants full control)."""
    with _lock:
        _registered.clear()
        _registered.extend(listeners)
        _set_active(tuple(_registered))


def _set_active(listeners: tuple[SagaListener, ...]) -> None:
    global _active
    _active = listeners
    _wire_attempt_hooks()


def _call(listener: SagaListener, hook: str, arg: Any) -> None:
    try:
        getattr(listener, hook)(arg)
    except Exception:
        log.exception("listener %s.%s raised; the saga goes on", type(listener).__name__, hook)


# --- called by the runtime after each committed decision ---------------------------------
def notify(snap: Any, decision: Any, event: Any, saga_started_at: datetime | None = None) -> None:
    """Tell every listener about a committed decision; never raises, costs ~nothing when idle."""
    listeners = _active if _active is not None else configure()
    if not listeners or not decision.transitions:
        return
    try:
        events = _events(snap, decision, event, saga_started_at)
    except Exception:
        log.exception("building transition events for saga %s failed", snap.id)
        return
    for ev in events:
        hook = "on_step_transition" if ev.step is not None else "on_saga_transition"
        for listener in listeners:
            _call(listener, hook, ev)


def refused_event(saga_id: str, saga: str, version: int, reason: str) -> None:
    """Tell listeners that an event of ``saga_id`` was refused here; never raises."""
    listeners = _active if _active is not None else configure()
    event = RefusedEvent(saga_id, saga, version, str(reason))
    for listener in listeners:
        _call(listener, "on_event_refused", event)


def message_refused(event: MessageRefused) -> None:
    """Tell listeners that a worker refused a poison message; never raises."""
    listeners = _active if _active is not None else configure()
    for listener in listeners:
        _call(listener, "on_message_refused", event)


def _events(
    snap: Any, decision: Any, event: Any, saga_started_at: datetime | None
) -> list[TransitionEvent]:
    now = time.time()
    cause = type(event).__name__
    attempt = _current_attempt.get()
    saga_state = str(snap.state)
    out = []
    for t in decision.transitions:
        duration: float | None = None
        from_state = None if t.from_state is None else str(t.from_state)
        to_state = str(t.to_state)
        if t.step is None:
            if saga_started_at is not None and to_state not in _IN_FLIGHT:
                started = saga_started_at
                if started.tzinfo is None:
                    started = started.replace(tzinfo=UTC)
                duration = max(0.0, now - started.timestamp())
        elif (
            attempt is not None and attempt.saga_id == snap.id and attempt.step == t.step
            and from_state in _IN_FLIGHT
        ):
            duration = now - attempt.started
        out.append(TransitionEvent(
            snap.id, snap.name, t.step, from_state, to_state, t.attempt, t.error, duration,
            cause, saga_state, now,
        ))
    return out


# --- attempt hooks: Celery signals, connected only when a listener wants them -------------


def _on_prerun(sender: Any = None, task_id: str = "", task: Any = None, args: Any = None,
               **_: Any) -> None:
    ctx = peek(args)  # None too for a malformed one: the step wrapper refuses it (poison)
    if ctx is None or task is None:
        return
    retries = int(getattr(task.request, "retries", 0) or 0)
    attempt = StepAttempt(
        saga_id=ctx.saga_id, saga=ctx.saga, step=ctx.step, phase=ctx.phase,
        attempt=ctx.attempt + retries, task_id=task_id, task=task,
    )
    _current_attempt.set(attempt)
    for listener in _active or ():
        _call(listener, "before_attempt", attempt)


def _on_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    attempt = _current_attempt.get()
    if attempt is not None and attempt.outcome is None:
        attempt.outcome, attempt.error = "failed", exception


def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    attempt = _current_attempt.get()
    if attempt is not None:
        attempt.outcome = "retry"
        attempt.error = reason if isinstance(reason, BaseException) else None


def _on_postrun(sender: Any = None, task_id: str = "", state: str | None = None,
                **_: Any) -> None:
    attempt = _current_attempt.get()
    if attempt is None or attempt.task_id != task_id:
        return
    _current_attempt.set(None)
    attempt.finished = time.time()
    if attempt.outcome is None:
        attempt.outcome = {"SUCCESS": "succeeded", "RETRY": "retry"}.get(state or "", "failed")
    for listener in _active or ():
        _call(listener, "after_attempt", attempt)


def _wire_attempt_hooks() -> None:
    """Connect the task signals only if some listener has attempt hooks: zero cost otherwise."""
    global _attempt_hooks
    wanted = any(_overrides(x, "before_attempt", "after_attempt") for x in _active or ())
    if wanted == _attempt_hooks:
        return
    pairs = ((task_prerun, _on_prerun), (task_failure, _on_failure),
             (task_retry, _on_retry), (task_postrun, _on_postrun))
    for signal, receiver in pairs:
        if wanted:
            signal.connect(receiver, weak=False, dispatch_uid=f"sagas.listeners.{signal.name}")
        else:
            signal.disconnect(receiver, dispatch_uid=f"sagas.listeners.{signal.name}")
    _attempt_hooks = wanted


# --- worker process lifecycle ----------------------------------------------------------------
def _worker_process_init(**_: Any) -> None:
    """A forked pool child: rebuild listeners so exporters and threads belong to this process."""
    global _active
    with _lock:
        _active = None
    configure()


def _wire_worker_signals() -> None:
    worker_process_init.connect(
        _worker_process_init, weak=False, dispatch_uid="sagas.listeners.worker_process_init"
    )


_wire_worker_signals()

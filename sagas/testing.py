"""Run a saga in-process for unit tests: no broker, no Redis, a private in-memory SQLite store.

``SagaRunner`` drives the production code end to end: ``Sagas.start``, the coordinator's
``decide`` and transition table through ``apply_event``, the SQL store, ``build_signature`` for
each step's context, the engine's own step wrapper (``StepTaskMixin``, which classifies a
participant's failure as transient, business or unknown and retries with the step's backoff) and
``recover_stalled`` for work that made no progress. Only the transport is replaced: the binding's
``publisher`` queues decided dispatches here instead of sending Celery messages, and a virtual
clock stands in for the wall clock, so a 30 s backoff or a 5 min stall deadline costs nothing.

>>> runner = SagaRunner(order_saga)
>>> result = runner.run(order_saga, order, faults={"charge_payment": Fault.transient(2)})
>>> result.state, result.steps["charge_payment"].attempts, result.elapsed
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import math
import os
import sqlite3
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import SimpleNamespace
from typing import Any

from celery import Celery
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded, WorkerLostError
from sqlalchemy import ColumnElement, func, select

from sagas.coordinator import (
    ACTION,
    COMPENSATION,
    Decision,
    Dispatch,
    Phase,
    StepFailed,
    StepSucceeded,
)
from sagas.definition import Saga
from sagas.engine import Sagas
from sagas.errors import BusinessError, DefinitionError, TransientError
from sagas.runtime import revoke
from sagas.runtime.binding import Binding
from sagas.runtime.dispatch import build_signature
from sagas.runtime.recovery import DEADLINE_STATES, LIVE_STATES, RecoveryReport, recover_stalled
from sagas.runtime.transitions import apply_event
from sagas.runtime.waiting import QueueLook
from sagas.runtime.worker import (
    WORKER_LOST_RETRY_DELAY,
    StepTaskMixin,
    describe,
    failure_event,
    normalize_result,
)
from sagas.settings import SagaSettings
from sagas.states import SAGA_SETTLED, SagaState, StepState
from sagas.store import connect, sql

__all__ = [
    "Fault",
    "FaultKind",
    "HistoryEntry",
    "InjectedFault",
    "Participant",
    "RunResult",
    "SagaDidNotSettle",
    "SagaRunner",
    "StepResult",
    "VirtualClock",
]

Participant = Callable[[dict[str, Any]], Any]
"""What runs a step: called with the step context dict, exactly as the Celery task would be."""

LOST_WORKER_MESSAGE = "Worker exited prematurely: signal 9 (SIGKILL)."


# --- the virtual clock ----------------------------------------------------------------------
class VirtualClock:
    """Time as the saga sees it: starts at the wall clock, moves only when the runner says so."""

    def __init__(self, start: datetime | None = None) -> None:
        self.start = (start or datetime.now(UTC)).replace(microsecond=0)
        self.elapsed = 0.0

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def advance_to(self, elapsed: float) -> None:
        """Move to ``elapsed`` seconds after the start (never backwards)."""
        self.elapsed = max(self.elapsed, elapsed)

    def seconds_at(self, when: datetime) -> float:
        aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        return (aware - self.start).total_seconds()


# The store reads the wall clock through ``sagas.store.sql.utcnow`` (stall deadlines, saga
# deadlines, step start and finish times). While a runner works, that function answers with the
# runner's virtual clock, in the runner's own thread (and context) only.
_active_clock: ContextVar[VirtualClock | None] = ContextVar("sagas_testing_clock", default=None)
_wall_utcnow = sql.utcnow
_patch_lock = threading.Lock()
_patch_users = 0


def _utcnow() -> datetime:
    clock = _active_clock.get()
    return clock.now() if clock is not None else _wall_utcnow()


@contextmanager
def _virtual_time(clock: VirtualClock) -> Iterator[None]:
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            sql.utcnow = _utcnow
        _patch_users += 1
    token = _active_clock.set(clock)
    try:
        yield
    finally:
        _active_clock.reset(token)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                sql.utcnow = _wall_utcnow


# --- faults ---------------------------------------------------------------------------------
class FaultKind(StrEnum):
    BUSINESS = "business"
    TRANSIENT = "transient"
    LOST_WORKER = "lost_worker_after_effect"
    SLOW = "slow"
    COMPENSATION_FAILS = "compensation_fails"


class InjectedFault(Exception):
    """What a compensation raises under ``Fault.compensation_fails()``."""


@dataclass(frozen=True)
class Fault:
    """Something that goes wrong in one step, injected by the runner around its participant.

    ``times`` counts calls of the step's phase within one saga (re-drives and retries
    included); None means every call.
    """

    kind: FaultKind
    phase: Phase = ACTION
    times: int | None = None
    seconds: float = 0.0
    error: BaseException | None = None

    @classmethod
    def business(cls, reason: str | BaseException = "refused") -> Fault:
        """The participant refuses for good (a ``BusinessError``): no retry, compensation."""
        error = reason if isinstance(reason, BaseException) else BusinessError(reason)
        return cls(FaultKind.BUSINESS, error=error)

    @classmethod
    def transient(
        cls, times: int = 1, *, phase: Phase = ACTION, error: BaseException | None = None
    ) -> Fault:
        """The first ``times`` calls raise a ``TransientError`` (or ``error``), then it works."""
        return cls(FaultKind.TRANSIENT, phase=phase, times=times, error=error)

    @classmethod
    def lost_worker_after_effect(cls, times: int = 1, *, phase: Phase = ACTION) -> Fault:
        """The participant runs (its effect is applied), then its worker process dies.

        Celery then fails the task with ``WorkerLostError``, which says nothing about the
        effect, unless the runner redelivers it (``lost_worker_redeliveries``).
        """
        return cls(FaultKind.LOST_WORKER, phase=phase, times=times)

    @classmethod
    def slow(cls, seconds: float, *, times: int | None = None, phase: Phase = ACTION) -> Fault:
        """The call takes ``seconds`` of virtual time; a shorter step time limit cuts it off
        with ``SoftTimeLimitExceeded`` before its effect, as on a worker."""
        if seconds <= 0:
            raise ValueError("Fault.slow needs a positive number of seconds")
        return cls(FaultKind.SLOW, phase=phase, times=times, seconds=seconds)

    @classmethod
    def compensation_fails(cls, error: BaseException | None = None) -> Fault:
        """Every call of the step's compensation raises: the saga parks COMPENSATION_FAILED."""
        return cls(FaultKind.COMPENSATION_FAILS, phase=COMPENSATION, error=error)

    def applies_to(self, call: int) -> bool:
        return self.times is None or call <= self.times

    def raised(self, step: str, call: int) -> BaseException:
        """A fresh exception for this call (one instance raised twice grows its traceback)."""
        if self.error is not None:
            return copy.copy(self.error).with_traceback(None)
        if self.kind is FaultKind.TRANSIENT:
            return TransientError(f"injected transient failure {call} of {step}")
        return InjectedFault(f"injected: the compensation of {step} fails for good")


Faults = Mapping[str, Fault | Sequence[Fault]]
"""Per step name: one fault or several (``Fault.slow`` adds up; of the rest the first wins)."""


# --- what a run returns ---------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryEntry:
    """One saga_events row, with the virtual time (seconds after the saga's start) it was made."""

    step: str | None
    from_state: str | None
    to_state: str
    attempt: int
    error: str | None
    at: float

    def as_tuple(self) -> tuple[str | None, str | None, str, int]:
        return (self.step, self.from_state, self.to_state, self.attempt)


@dataclass(frozen=True)
class StepResult:
    name: str
    state: StepState
    result: Any
    error: str | None
    attempts: int
    compensation_attempts: int
    calls: int  # how often the runner called the action's participant
    compensation_calls: int


@dataclass(frozen=True)
class RunResult:
    """A saga as the store has it after the run, plus what the runner saw happen."""

    id: str
    name: str
    version: int
    state: SagaState
    error: str | None
    steps: dict[str, StepResult]
    history: tuple[HistoryEntry, ...]
    elapsed: float  # virtual seconds from the start to the saga's last recorded event
    input: dict[str, Any] = field(default_factory=dict)

    @property
    def settled(self) -> bool:
        return self.state in SAGA_SETTLED

    @property
    def results(self) -> dict[str, Any]:
        return {n: s.result for n, s in self.steps.items() if s.result is not None}

    def step_states(self) -> dict[str, StepState]:
        return {n: s.state for n, s in self.steps.items()}

    def history_tuples(self) -> list[tuple[str | None, str | None, str, int]]:
        """Every (step, from_state, to_state, attempt) in order (step None: the saga's own)."""
        return [e.as_tuple() for e in self.history]

    def step_history(self, step: str | None) -> list[tuple[str | None, str, int]]:
        """One step's (from_state, to_state, attempt) in order; None: the saga's own moves."""
        return [(e.from_state, e.to_state, e.attempt) for e in self.history if e.step == step]

    def moves(self, to_state: str) -> list[str]:
        """The steps that moved into ``to_state``, in order (e.g. COMPENSATED: newest first)."""
        return [e.step for e in self.history if e.step is not None and e.to_state == to_state]


class SagaDidNotSettle(AssertionError):
    """A run kept going past its limit (a fault that never clears after the pivot, say)."""

    def __init__(self, message: str, result: RunResult | None = None) -> None:
        super().__init__(message)
        self.result = result


# --- the runner -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What one delivery will do, decided when it starts (its call number picks the faults)."""

    duration: float = 0.0
    timed_out: bool = False
    raises: BaseException | None = None
    lose_worker: bool = False


@dataclass
class _Delivery:
    """One step message as a worker holds it: the context and Celery's retry count."""

    saga_id: str
    step: str
    phase: Phase
    task: str
    body: dict[str, Any]
    soft_time_limit: float | None
    task_id: str = ""
    queue: str = ""
    retries: int = 0
    plan: _Plan | None = None  # set once started; a slow call finishes later
    revoked: bool = False  # revoked before it started: the worker discards it, reports it


class _Task(StepTaskMixin):
    """Stands in for the Celery task a worker runs: the engine's step wrapper does the rest.

    ``StepTaskMixin.__call__`` is production's step wrapper; it reads ``app``, ``request``,
    ``run`` and ``retry`` from the task, and these are all it gets here.
    """

    def __init__(self, app: Celery, body: Callable[[dict[str, Any]], Any], retries: int) -> None:
        self.app = app
        self.request = SimpleNamespace(retries=retries)
        self._body = body

    def run(self, ctx: dict[str, Any]) -> Any:
        return self._body(ctx)

    def retry(
        self, *, exc: BaseException, countdown: float, max_retries: int | None, **_: Any
    ) -> Any:
        """Celery's ``Task.retry``: the exception to raise, or ``exc`` past ``max_retries``."""
        if max_retries is not None and int(self.request.retries) + 1 > max_retries:
            raise exc
        return Retry(exc=exc, when=countdown)


class SagaRunner:
    """Runs sagas in-process through the production engine, on a virtual clock.

    ``participants`` maps task names to functions; a step whose action (or compensation) is a
    Celery task runs that task's plain function (``task.run``) unless overridden here, and a step
    given by task name only needs one. ``lost_worker_redeliveries`` is how often Celery sends a
    task again after its worker died before failing it: 0 with Celery's defaults; with
    ``task_retry_on_worker_lost`` it is the task's ``max_retries`` (3 in the sample app).
    """

    def __init__(
        self,
        *sagas: Saga,
        participants: Mapping[str, Participant] | None = None,
        settings: SagaSettings | None = None,
        database_url: str | None = None,
        lost_worker_redeliveries: int = 0,
        clock: VirtualClock | None = None,
    ) -> None:
        self.clock = clock or VirtualClock()
        self.lost_worker_redeliveries = lost_worker_redeliveries
        self._keepalive: sqlite3.Connection | None = None
        if database_url is None:
            # A named in-memory database shared by the store's pooled connections; this
            # connection keeps it alive until close().
            name = f"sagas-testing-{uuid.uuid4().hex}"
            database_url = f"sqlite:///file:{name}?mode=memory&cache=shared&uri=true"
            self._keepalive = sqlite3.connect(
                f"file:{name}?mode=memory&cache=shared", uri=True, check_same_thread=False
            )
        base = settings if settings is not None else SagaSettings()
        self.settings = base.model_copy(update={
            "database_url": database_url, "sagas_listeners": "",
        })
        # A throwaway app: its broker is never used, since the publisher below replaces it.
        self.app = Celery(f"sagas-testing-{uuid.uuid4().hex[:8]}", broker="memory://",
                          backend="disabled://", set_as_current=False)
        self.engine = Sagas(self.app, self.settings)
        self.binding: Binding = self.engine._binding
        self.binding.publisher = self._publish
        self.binding.revoker = self._revoke
        self.binding.probe = self._probe
        with warnings.catch_warnings():
            # SQLAlchemy picks its per-thread pool for mode=memory URLs and warns that a
            # future release will pool them like files; either keeps the database alive.
            warnings.filterwarnings("ignore", message=r"Selection of the SingletonThreadPool")
            self.engine.upgrade_schema()
        self._participants: dict[str, Participant] = dict(participants or {})
        self._overrides = frozenset(self._participants)
        self._queue: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._faults: dict[str, dict[str, tuple[Fault, ...]]] = {}
        self._calls: Counter[tuple[str, str, str]] = Counter()
        self._started_at: dict[str, float] = {}
        self._last_recovery: float | None = None
        self._delivered_since_recovery = True
        for saga in sagas:
            self.register(saga)

    # --- setup --------------------------------------------------------------------------
    def register(self, saga: Saga) -> Saga:
        """Make ``saga`` runnable here; every task it names needs a participant."""
        missing = []
        for step in saga.steps.values():
            for task, name in ((step.action, step.action_name),
                               (step.compensation, step.compensation_name)):
                if name is None or name in self._overrides:
                    continue
                run = getattr(task, "run", None)
                if callable(run):
                    self._participants[name] = run
                elif name not in self._participants:
                    missing.append(name)
        if missing:
            raise DefinitionError(
                f"saga {saga.name!r}: no function for task(s) {', '.join(sorted(missing))}; "
                "pass SagaRunner(..., participants={task_name: function})"
            )
        if self.binding.find(saga.name, saga.version) is not saga:
            self.engine.register(saga)
        return saga

    @property
    def store(self) -> sql.Store:
        return self.binding.store

    def close(self) -> None:
        """Drop the store (the in-memory database goes with its last connection)."""
        engine = connect._engines.pop((os.getpid(), self.settings.database_url), None)
        if engine is not None:
            engine.dispose()
        if self._keepalive is not None:
            self._keepalive.close()
            self._keepalive = None

    def __enter__(self) -> SagaRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- running ------------------------------------------------------------------------
    def run(
        self,
        saga: Saga | str,
        data: Any,
        *,
        faults: Faults | None = None,
        saga_id: str | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
        for_seconds: float | None = None,
        max_deliveries: int = 1000,
    ) -> RunResult:
        """Start the saga and run everything until nothing is left to do; returns its result.

        A saga that is still live when nothing more is scheduled comes back unsettled (assert
        on ``result.state``); one still busy after ``max_deliveries`` raises
        ``SagaDidNotSettle`` with the result so far.
        """
        started = self.start(saga, data, faults=faults, saga_id=saga_id,
                             idempotency_key=idempotency_key, version=version)
        try:
            self.drain(for_seconds=for_seconds, max_deliveries=max_deliveries)
        except SagaDidNotSettle as exc:
            exc.result = self.result(started)
            raise
        return self.result(started)

    def start(
        self,
        saga: Saga | str,
        data: Any,
        *,
        faults: Faults | None = None,
        saga_id: str | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> str:
        """Start a saga (its first steps are queued, not run: see ``drain``); returns its id."""
        definition = self.register(saga) if isinstance(saga, Saga) else self.engine.saga(
            saga, version)
        planned = self._faults_for(definition, faults)
        started_at = self.clock.elapsed
        with _virtual_time(self.clock):
            started = self.engine.start(
                definition, data, saga_id=saga_id, idempotency_key=idempotency_key,
                version=version,
            ).id
        if started not in self._started_at:  # a duplicate start keeps the first one's faults
            self._started_at[started] = started_at
            self._faults[started] = planned
        return started

    def drain(self, *, for_seconds: float | None = None, max_deliveries: int = 1000) -> None:
        """Deliver queued steps in virtual-time order, running the reconciler whenever a saga's
        stall deadline (or own deadline) passes, until nothing more is due."""
        until = None if for_seconds is None else self.clock.elapsed + for_seconds
        done = 0
        with _virtual_time(self.clock):
            while True:
                next_due = self._queue[0][0] if self._queue else None
                recovery = self._next_recovery()
                if recovery is not None and (next_due is None or recovery < next_due):
                    next_due, job = recovery, None
                elif next_due is not None:
                    job = self._queue[0][2]
                else:
                    break
                if until is not None and next_due > until:
                    self.clock.advance_to(until)
                    break
                done += 1
                if done > max_deliveries:
                    raise SagaDidNotSettle(
                        f"still busy after {max_deliveries} deliveries and reconciler runs "
                        f"({self.clock.elapsed:.1f} virtual seconds)"
                    )
                self.clock.advance_to(next_due)
                if job is None:
                    self._recover()
                else:
                    heapq.heappop(self._queue)
                    self._deliver(job)
                    self._delivered_since_recovery = True

    def recover(self) -> RecoveryReport:
        """One reconciler pass at the virtual now (beat runs one every recovery_interval)."""
        with _virtual_time(self.clock):
            report = self._recover()
        return report

    def advance(self, seconds: float) -> None:
        """Let virtual time pass without delivering anything (then ``drain`` or ``recover``)."""
        self.clock.advance_to(self.clock.elapsed + seconds)

    def retry(self, saga_id: str, *, faults: Faults | None = None) -> RunResult:
        """An operator's ``sagas retry``, then a drain (e.g. resume a parked compensation)."""
        if faults is not None:
            self._faults[saga_id] = self._faults_for(self._definition(saga_id), faults)
        with _virtual_time(self.clock):
            self.engine.retry(saga_id)
        self.drain()
        return self.result(saga_id)

    def cancel(self, saga_id: str, reason: str = "cancelled by operator") -> RunResult:
        """An operator's ``sagas cancel``, then a drain."""
        with _virtual_time(self.clock):
            self.engine.cancel(saga_id, reason)
        self.drain()
        return self.result(saga_id)

    def result(self, saga_id: str) -> RunResult:
        """The saga as the store has it now (the same view ``sagas show --json`` prints)."""
        view = self.store.get_view(saga_id)
        start = self._started_at.get(saga_id, 0.0)
        history = tuple(
            HistoryEntry(
                e["step"], e["from_state"], e["to_state"], int(e["attempt"]), e["error"],
                round(self.clock.seconds_at(_as_datetime(e["at"])) - start, 6),
            )
            for e in view["events"]
        )
        return RunResult(
            id=saga_id, name=view["name"], version=int(view["version"]),
            state=SagaState(view["state"]), error=view["error"],
            steps={
                s["name"]: StepResult(
                    s["name"], StepState(s["state"]), s["result"], s["error"],
                    int(s["attempts"]), int(s["compensation_attempts"]),
                    self._calls[(saga_id, s["name"], ACTION)],
                    self._calls[(saga_id, s["name"], COMPENSATION)],
                )
                for s in view["steps"]
            },
            history=history,
            elapsed=max((e.at for e in history), default=0.0),
            input=view["context"]["input"],
        )

    # --- the transport ------------------------------------------------------------------
    def _publish(
        self, binding: Binding, saga: Saga, snap: Any, dispatches: list[Dispatch]
    ) -> None:
        """The binding's publisher: queue each step message instead of sending it."""
        for dispatch in dispatches:
            sig = build_signature(binding.app, binding.settings.saga_queue, saga, snap, dispatch)
            # Through JSON, as the broker would carry it: a participant gets a fresh copy.
            body = json.loads(json.dumps(sig.args[0]))
            limit = sig.options.get("soft_time_limit")
            job = _Delivery(
                snap.id, dispatch.step, dispatch.phase, str(sig.task), body,
                None if limit is None else float(limit), task_id=str(sig.options["task_id"]),
                queue=str(sig.options["queue"]),
            )
            self._schedule(job, float(sig.options.get("countdown", 0.0)))

    def _schedule(self, job: _Delivery, delay: float) -> None:
        heapq.heappush(self._queue, (self.clock.elapsed + max(delay, 0.0), next(self._seq), job))

    def _revoke(self, binding: Binding, task_ids: list[str]) -> None:
        """The app's remote control: a queued message with a revoked id is never run."""
        revoked = set(task_ids)
        for _, _, job in self._queue:
            if job.task_id in revoked and job.plan is None:
                job.revoked = True

    def _probe(self, queues: Sequence[str]) -> dict[str, QueueLook]:
        """What a broker would say of each queue: the task ids of the messages not started."""
        return {q: QueueLook(q, frozenset(job.task_id for _, _, job in self._queue
                                          if job.queue == q and job.plan is None))
                for q in queues}

    def _deliver(self, job: _Delivery) -> None:
        if job.revoked:
            # What the worker does with a revoked message: discard it, report it as never run.
            self._apply(job, failure_event(job.step, job.phase, revoke.revoked_error(),
                                           int(job.body["attempt"])))
            return
        if job.plan is None:
            key = (job.saga_id, job.step, job.phase)
            self._calls[key] += 1
            plan = self._plan(job, self._calls[key])
            if plan.duration > 0:
                # The call is busy for a while: it finishes (or is cut off) later, and other
                # deliveries (parallel branches) run meanwhile.
                limit = job.soft_time_limit
                timed_out = limit is not None and plan.duration > limit
                job.plan = replace(plan, timed_out=timed_out)
                self._schedule(job, limit if timed_out and limit is not None else plan.duration)
                return
            job.plan = plan
        self._finish(job, job.plan)

    def _plan(self, job: _Delivery, call: int) -> _Plan:
        plan = _Plan()
        for fault in self._faults.get(job.saga_id, {}).get(job.step, ()):
            if fault.phase != job.phase or not fault.applies_to(call):
                continue
            if fault.kind is FaultKind.SLOW:
                plan = replace(plan, duration=plan.duration + fault.seconds)
            elif plan.raises is None and not plan.lose_worker:
                if fault.kind is FaultKind.LOST_WORKER:
                    plan = replace(plan, lose_worker=True)
                else:
                    plan = replace(plan, raises=fault.raised(job.step, call))
        return plan

    def _finish(self, job: _Delivery, plan: _Plan) -> None:
        participant = self._participants[job.task]
        if plan.lose_worker and not plan.timed_out:
            participant(copy.deepcopy(job.body))  # the effect happens; the process dies after
            self._worker_lost(job)
            return

        limit = job.soft_time_limit

        def body(ctx: dict[str, Any]) -> Any:
            if plan.timed_out:
                raise SoftTimeLimitExceeded()
            if plan.raises is not None:
                raise plan.raises
            began = time.monotonic()
            result = participant(ctx)
            if limit is not None and time.monotonic() - began > limit:
                # A participant that really took longer than its limit would have been cut
                # off on a worker: the same outcome here (its effect has happened, though).
                raise SoftTimeLimitExceeded()
            return result

        try:
            result = _Task(self.app, body, job.retries)(copy.deepcopy(job.body))
        except Retry as retry:
            self._again(job, float(retry.when or 0.0))
        except Ignore:
            pass  # the pivot's outcome is unknown: left to the reconciler, as on a worker
        except Exception as exc:
            # What sagas.step_failed (the link_error target) records from the stored failure.
            self._apply(job, failure_event(job.step, job.phase, describe(exc),
                                           int(job.body["attempt"])))
        else:
            if not job.body.get("inline"):
                # A task the engine does not wrap reports through sagas.step_succeeded (link).
                self._apply(job, StepSucceeded(job.step, job.phase, normalize_result(result)))

    def _worker_lost(self, job: _Delivery) -> None:
        if job.retries < self.lost_worker_redeliveries:
            self._again(job, float(WORKER_LOST_RETRY_DELAY))
            return
        error = describe(WorkerLostError(LOST_WORKER_MESSAGE))
        self._apply(job, failure_event(job.step, job.phase, error, int(job.body["attempt"])))

    def _again(self, job: _Delivery, delay: float) -> None:
        """Celery sends the same message again with one more retry counted."""
        self._schedule(replace(job, retries=job.retries + 1, plan=None), delay)

    def _apply(self, job: _Delivery, event: StepFailed | StepSucceeded) -> Decision:
        return apply_event(self.binding, job.saga_id, event)

    # --- the reconciler -----------------------------------------------------------------
    def _next_recovery(self) -> float | None:
        """When beat's next reconciler run (one per recovery_interval) would find a saga
        stalled or past its own deadline; None when none ever will without a delivery.

        A run handles every deadline passed by then; one it left alone (a pivot in flight,
        say) can only matter again after a delivery changed something, so until then only
        later deadlines count. This keeps the beat from being simulated tick by tick.
        """
        t = sql.sagas_t
        stall, deadline = t.c.stall_deadline, t.c.deadline_at
        live: ColumnElement[bool] = t.c.state.in_([str(s) for s in LIVE_STATES])
        early: ColumnElement[bool] = t.c.state.in_([str(s) for s in DEADLINE_STATES])
        if self._last_recovery is not None and not self._delivered_since_recovery:
            after = self.clock.start + timedelta(seconds=self._last_recovery)
            live, early = live & (stall > after), early & (deadline > after)
        with self.store.read() as conn:
            found = [
                conn.execute(select(func.min(stall)).where(live)).scalar(),
                conn.execute(select(func.min(deadline)).where(early)).scalar(),
            ]
        due = [self.clock.seconds_at(_as_datetime(d)) for d in found if d is not None]
        if not due:
            return None
        interval = self.settings.recovery_interval
        tick = (math.floor(min(due) / interval) + 1) * interval  # strictly past the deadline
        if self._last_recovery is not None:
            tick = max(tick, (math.floor(self._last_recovery / interval) + 1) * interval)
        return max(tick, self.clock.elapsed)

    def _recover(self) -> RecoveryReport:
        self._last_recovery = self.clock.elapsed
        self._delivered_since_recovery = False
        return recover_stalled(self.binding, now=self.clock.now())

    # --- bookkeeping --------------------------------------------------------------------
    def _faults_for(self, saga: Saga, faults: Faults | None) -> dict[str, tuple[Fault, ...]]:
        by_step: dict[str, tuple[Fault, ...]] = {}
        for step, given in (faults or {}).items():
            if step not in saga.steps:
                raise ValueError(f"saga {saga.name!r} has no step {step!r} to inject a fault in")
            listed = (given,) if isinstance(given, Fault) else tuple(given)
            for fault in listed:
                if fault.phase == COMPENSATION and saga.steps[step].compensation is None:
                    raise ValueError(f"step {step!r} has no compensation to fail")
            by_step[step] = listed
        return by_step

    def _definition(self, saga_id: str) -> Saga:
        view = self.store.get_view(saga_id)
        return self.engine.saga(view["name"], int(view["version"]))


def _as_datetime(value: Any) -> datetime:
    """SQLite may hand a timestamp back as text; everything the store writes is UTC."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


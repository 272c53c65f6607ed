"""The binding: ``Sagas(app, settings)`` puts the engine on any Celery app.

One call registers the engine's tasks on that app (routed to ``settings.saga_queue``), runs
every saga step through the engine's step wrapper without the app setting ``task_cls``, adds the
reconciler to the app's beat schedule, and publishes every start, step and compensation through
that app, never through ``current_app``. Two apps with two engines in one process stay apart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery, Task
from celery.signals import task_revoked, worker_init, worker_ready
from kombu.utils.imports import symbol_by_name

from sagas.coordinator import Decision
from sagas.definition import Saga
from sagas.errors import DefinitionError, SagaNotFoundError, StoreUnavailableError
from sagas.observe import setup as observe_setup
from sagas.runtime import consumer, poison, revoke, worker
from sagas.runtime.binding import Binding, bind, binding_of
from sagas.runtime.dispatch import (
    RECOVER_TASK,
    START_TASK,
    STEP_FAILED_TASK,
    STEP_SUCCEEDED_TASK,
)
from sagas.runtime.handle import SagaHandle, SagaOutcome, read_outcomes
from sagas.runtime.recovery import BEAT_ENTRY, RecoveryReport, beat_entry, recover_stalled
from sagas.runtime.relay import Relay
from sagas.runtime.stalls import Stall, stall_of
from sagas.runtime.starter import StartTask, make_start_task
from sagas.runtime.transitions import cancel_saga, retry_saga, start_saga
from sagas.settings import SagaSettings
from sagas.states import SagaState
from sagas.store import locks, migrate, outages
from sagas.store.sql import Store, utcnow

log = logging.getLogger("sagas")

ENGINE_TASKS = frozenset({STEP_FAILED_TASK, STEP_SUCCEEDED_TASK, START_TASK, RECOVER_TASK})
_ENGINE_ROUTER = "__sagas_engine_router__"

AuditCheck = Callable[["Sagas"], Iterable[Any]]


@dataclass(frozen=True)
class VersionInUse:
    """One saga version: its graph's fingerprint, how many instances run on it, and whether
    this process registers it (and with the same graph)."""

    name: str
    version: int
    fingerprint: str | None
    in_flight: int
    total: int
    registered: bool
    changed: bool
"""A domain's own audit: given the engine, yields findings (see ``sagas.ops.audit``)."""


class Sagas:
    """The saga engine bound to one Celery app.

    >>> app = Celery("trips", broker="redis://127.0.0.1:6379/0", backend="redis://...")
    >>> engine = Sagas(app, SagaSettings(database_url="sqlite:///var/trips.db"))
    >>> trip = engine.register(Saga("trip", steps=[...]))
    >>> engine.start(trip, {"traveller": "ada"}).wait(timeout=30).state
    """

    def __init__(
        self,
        app: Celery,
        settings: SagaSettings | None = None,
        *,
        sagas: Iterable[Saga] = (),
    ) -> None:
        self.app = app
        self._binding = Binding(app, settings if settings is not None else SagaSettings())
        self._binding.engine = self
        bind(self._binding)
        self.audit_checks: list[AuditCheck] = []
        self._unwrapped = False
        worker.install(self._binding)
        self._install_reconciler()
        observe_setup.install(
            self._binding.settings, lambda: self._binding.store, key=f"{app.main}@{id(app)}"
        )
        uid = f"sagas.engine.{id(self)}"
        worker_init.connect(self._on_worker_init, weak=False, dispatch_uid=f"{uid}.init")
        worker_ready.connect(self._on_worker_ready, weak=False, dispatch_uid=f"{uid}.ready")
        task_revoked.connect(self._on_task_revoked, weak=False, dispatch_uid=f"{uid}.revoked")
        for saga in sagas:
            self.register(saga)

    # --- binding ----------------------------------------------------------------------------
    @classmethod
    def of(cls, app: Celery) -> Sagas:
        """The engine bound to ``app``; raises ``DefinitionError`` when there is none."""
        binding = binding_of(app)
        engine = None if binding is None else binding.engine
        if not isinstance(engine, Sagas):
            raise DefinitionError(f"Celery app {app.main!r} has no saga engine: call Sagas(app)")
        return engine

    @property
    def settings(self) -> SagaSettings:
        return self._binding.settings

    @settings.setter
    def settings(self, settings: SagaSettings) -> None:
        """Replace the settings (tests point one process at another database this way)."""
        self._binding.settings = settings

    @property
    def store(self) -> Store:
        return self._binding.store

    def _install_reconciler(self) -> None:
        settings = self._binding.settings

        # No task events: Flower's Tasks page keeps the operator's sagas, not a run every 5 s.
        @self.app.task(name=RECOVER_TASK, ignore_result=True, queue=settings.saga_queue,  # type: ignore[untyped-decorator]
                       shared=False, send_events=False)
        def recover() -> dict[str, Any]:
            """Beat's entry point; runs on the saga queue like the coordinator's other tasks.

            A store outage skips the pass, said once per outage; beat sends the next pass
            anyway (a traceback every interval would bury the logs).
            """
            try:
                return recover_stalled(self._binding).as_dict()
            except StoreUnavailableError as exc:
                outages.down(self.store, exc, "saga store unavailable: the reconciler skips "
                             "its passes until it answers")
                return {"skipped": "saga store unavailable"}

        self.app.on_after_configure.connect(
            self._on_configure, weak=False, dispatch_uid=f"sagas.engine.{id(self)}.configure"
        )
        if self.app.configured:
            self._on_configure()

    def _on_configure(self, sender: Any = None, **_: Any) -> None:
        """Put the reconciler in beat and route the engine's tasks, on every (re)configure.

        Celery replaces ``app.conf`` when the app loads its configuration (again, after a late
        ``config_from_object``), so both are applied whenever that happens, and kept out of the
        way of the app's own entries and routes.
        """
        settings = self._binding.settings
        entry = beat_entry(settings)
        conf = self.app.conf
        schedule = dict(conf.beat_schedule or {})
        schedule[BEAT_ENTRY] = {
            "task": entry["task"], "schedule": entry["schedule"], "options": entry["options"],
        }
        conf.beat_schedule = schedule
        routes = conf.task_routes
        existing = [] if routes is None else list(routes) if isinstance(routes, list | tuple) \
            else [routes]
        if not any(getattr(r, _ENGINE_ROUTER, False) for r in existing):
            conf.task_routes = [self._route, *existing]
            self.app.amqp.flush_routes()
            self.app.amqp.__dict__.pop("router", None)  # a router built before sees the change

    def _route(self, name: str, *_: Any, **__: Any) -> dict[str, str] | None:
        """The engine's own tasks go to the saga queue, whoever sends them and however."""
        return {"queue": self._binding.settings.saga_queue} if name in ENGINE_TASKS else None

    # --- sagas ------------------------------------------------------------------------------
    def register(self, saga: Saga) -> Saga:
        """Make ``saga`` known to this engine (and so to its workers); returns it."""
        self._binding.add(saga)
        self._wrap_steps(finalize=False)
        return saga

    @property
    def sagas(self) -> dict[str, Saga]:
        return dict(self._binding.sagas)

    def saga(self, name: str, version: int | None = None) -> Saga:
        """The registered saga ``name`` at ``version`` (the newest when None).

        Raises ``UnknownSagaError`` (or ``UnknownSagaVersionError``) when it is not registered.
        """
        return self._binding.saga(name, version)

    def versions(self) -> list[VersionInUse]:
        """Every saga version in the store or registered here, with its in-flight count.

        ``in_flight`` counts instances not yet settled (parked included): an old version with
        none left can be deleted from the code.
        """
        rows = self.store.versions_in_use()
        seen = {(r["name"], r["version"]) for r in rows}
        out = [
            VersionInUse(
                r["name"], r["version"], r["fingerprint"], r["in_flight"], r["total"],
                registered=(found := self._binding.find(r["name"], r["version"])) is not None,
                changed=found is not None and r["fingerprint"] is not None
                and found.fingerprint != r["fingerprint"],
            )
            for r in rows
        ]
        out += [
            VersionInUse(s.name, s.version, s.fingerprint, 0, 0, registered=True, changed=False)
            for s in self._binding.all_versions() if (s.name, s.version) not in seen
        ]
        return sorted(out, key=lambda v: (v.name, v.version, v.fingerprint or ""))

    def changed_graphs(self) -> list[VersionInUse]:
        """Versions in flight whose graph here differs from the one they were started with."""
        return [v for v in self.versions() if v.changed and v.in_flight]

    def _wrap_steps(self, finalize: bool = True) -> None:
        """Run every registered step task through the engine's wrapper (idempotent).

        Before the app is finalized (while modules still import) only tasks already created are
        wrapped; the rest are at worker start or at the first start, when the app finalizes.
        """
        registry = self.app.tasks if finalize else self.app._tasks
        missing = False
        for saga in self._binding.all_versions():
            for step in saga.steps.values():
                for name in (step.action_name, step.compensation_name):
                    if name is None:
                        continue
                    task = registry.get(name)
                    if isinstance(task, Task):
                        worker.wrap_step_task(task, step.name)
                    else:
                        missing = True
        self._unwrapped = missing and not finalize

    def _prepare(self) -> None:
        if self._unwrapped or not self.app.finalized:
            self._wrap_steps(finalize=True)

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        try:
            self._wrap_steps(finalize=True)
        except DefinitionError as exc:
            # Celery logs and swallows a receiver's Exception; a worker that would run this
            # step wrongly must not start at all.
            log.critical("worker refused to start: %s", exc)
            raise SystemExit(1) from exc
        _quiet_reconciler_logs()
        revoke.track_connections()  # before the pool forks: its processes share the record
        # Poison (undecodable, unknown task, too large, ...) is dead-lettered, not just dropped.
        if hasattr(sender, "consumer_cls"):
            sender.consumer_cls = consumer.poison_aware(
                symbol_by_name(sender.consumer_cls))  # type: ignore[no-untyped-call]
        # Every other task of the app too: a step of a version this worker does not register
        # (renamed since) must reach the coordinator's refusal, not run as a plain task.
        registry: Any = self.app.tasks  # type: ignore[union-attr]
        for name, task in registry.items():
            if not name.startswith("celery.") and name not in ENGINE_TASKS:
                try:
                    worker.wrap_step_task(task, None)
                except DefinitionError:
                    log.debug("task %s left as it is: it cannot take the step wrapper", name)

    def _on_task_revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """A worker discarded a revoked message: a saga action's is reported as never run."""
        if getattr(sender, "app", None) is not self.app or request is None:
            return
        try:
            revoke.report_revoked_request(self._binding, request)
        except Exception as exc:  # recovery undoes the step once its deadline passes
            log.warning("could not report revoked task %s: %s", getattr(request, "id", "?"), exc)

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        for line in worker.unknown_task_report(self._binding):
            log.error(line)
        try:
            changed = self.changed_graphs()
        except Exception as exc:  # the store may not be up yet; the events say it again later
            log.warning("could not compare saga graphs with the instances in flight: %s", exc)
            return
        for v in changed:
            log.error(
                "saga %r v%d: %d instance(s) in flight were started with graph %s, but this "
                "worker's v%d is %s: register the old graph as v%d and the new one as v%d "
                "(see README, Versions)", v.name, v.version, v.in_flight, v.fingerprint,
                v.version, self._binding.saga(v.name, v.version).fingerprint, v.version,
                v.version + 1,
            )

    # --- running sagas ----------------------------------------------------------------------
    def start(
        self,
        saga: Saga | str,
        data: Any,
        *,
        saga_id: str | None = None,
        idempotency_key: str | None = None,
        version: int | None = None,
    ) -> SagaHandle:
        """Record a new saga and publish its first steps; a duplicate start returns the first.

        Raises ``InvalidSagaInputError`` for input its model refuses (or larger as JSON than
        ``SAGAS_MAX_MESSAGE_BYTES``: its step messages would be refused),
        ``IdempotencyConflictError`` for a key reused with another payload,
        ``StoreUnavailableError`` when the store is down.
        """
        self._prepare()
        poison.check_input_size(self._binding.settings, data)
        started = start_saga(
            self._binding, saga, data, saga_id=saga_id, idempotency_key=idempotency_key,
            version=version,
        )
        return SagaHandle(self._binding, started)

    def start_task(
        self, saga: Saga | str, *, name: str | None = None, **options: Any
    ) -> StartTask:
        """A Celery task that starts ``saga`` durably, for code that starts work with ``.delay``.

        ``task.delay(data)`` (or ``apply_async((data,), {"idempotency_key": key},
        task_id=...)``) records the saga in the store and publishes its first steps before it
        returns, in the caller's process; the AsyncResult's id is the saga id. A store that
        cannot be reached raises ``StoreUnavailableError`` there. With ``countdown``/``eta``
        the saga is recorded PENDING and started then. ``name`` defaults to
        ``sagas.start.<saga>``; other options go to ``app.task`` (the queue defaults to the
        saga queue, where a start message sent by name is run).
        """
        definition = saga if isinstance(saga, Saga) else self.saga(saga)
        return make_start_task(self._binding, definition, name, **options)

    def handle(self, saga_id: str) -> SagaHandle:
        """A handle on an existing saga id (e.g. the id of ``start_order_saga.delay(...)``)."""
        return SagaHandle(self._binding, saga_id)

    def states(self, saga_ids: Sequence[str]) -> dict[str, SagaState]:
        """The states of many sagas in one query; ids never recorded are absent."""
        return {k: SagaState(v) for k, v in self.store.saga_states(saga_ids).items()}

    def outcomes(self, saga_ids: Sequence[str]) -> dict[str, SagaOutcome]:
        """Many sagas with their steps, in two queries; ids never recorded are absent."""
        return read_outcomes(self._binding, saga_ids)

    def stall(self, saga_id: str, now: datetime | None = None) -> Stall | None:
        """Why the saga makes no progress, read from its log; None when it is not stalled.

        See ``sagas.runtime.stalls``: a step recovery re-drove or held (its message still
        waits in the broker) since its last progress, or one past its deadline.
        """
        snap = self.store.read_outcomes([saga_id]).get(saga_id)
        if snap is None:
            raise SagaNotFoundError(f"no saga with id {saga_id!r}")
        definition = self._binding.find(snap.name, snap.version)
        return stall_of(self.settings, definition, snap, now or utcnow())

    def view(self, saga_id: str) -> dict[str, Any]:
        """The saga as ``sagas show --json`` and ``GET /sagas/{id}`` give it: the store's view
        (steps, context, history) plus ``stalled`` (None, or why it makes no progress)."""
        view = self.store.get_view(saga_id)
        stall = self.stall(saga_id)
        view["stalled"] = None if stall is None else stall.as_dict(self.settings)
        return view

    def lock_holder(self, key: str) -> str | None:
        """The saga holding semantic lock ``key``, or None: for a pessimistic view (a read API
        that shows a record as "being changed" while a saga holds its key)."""
        with self.store.read() as conn:
            return locks.holder_of(conn, key)

    def locks(self, key: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Held semantic locks, newest first (or just ``key``): each with its holder and the
        sagas waiting for it in arrival order."""
        with self.store.read() as conn:
            return locks.listing(conn, key, limit)

    def retry(self, saga_id: str) -> Decision:
        """Resume a parked (COMPENSATION_FAILED, FORWARD_FAILED) saga, or re-drive a stalled one."""
        self._prepare()
        return retry_saga(self._binding, saga_id)

    def cancel(self, saga_id: str, reason: str = "cancelled by operator") -> Decision:
        """Compensate a running saga; ``SagaStateError`` once its pivot has succeeded."""
        self._prepare()
        return cancel_saga(self._binding, saga_id, reason)

    # --- operating --------------------------------------------------------------------------
    def upgrade_schema(self) -> None:
        """Create or migrate the engine's own tables (and only those) in the store."""
        migrate.upgrade(self.store.engine)

    def recover(self, *, limit: int | None = None, dry_run: bool = False) -> RecoveryReport:
        """One reconciler pass now (beat runs one every ``settings.recovery_interval``)."""
        self._prepare()
        return recover_stalled(self._binding, limit=limit, dry_run=dry_run)

    def relay(self, **options: Any) -> Relay:
        """An outbox relay over this engine's store and settings (``run()`` or ``run_once()``)."""
        return Relay(self.store, self.settings, **options)

    def add_audit_check(self, check: AuditCheck) -> AuditCheck:
        """A domain's own invariants, run by ``sagas audit`` after the engine's."""
        self.audit_checks.append(check)
        return check

    def __repr__(self) -> str:
        return f"Sagas(app={self.app.main!r}, sagas={sorted(self._binding.sagas)!r})"


setattr(Sagas._route, _ENGINE_ROUTER, True)  # how a re-configure finds the router already there


class _QuietReconciler(logging.Filter):
    """Drops Celery's "received" and "succeeded" INFO lines of the reconciler's beat task.

    It runs every few seconds; a pass that does something logs its own WARNING summary.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        ours = isinstance(args, dict) and args.get("name") == RECOVER_TASK
        return not (ours and record.levelno <= logging.INFO)


def _quiet_reconciler_logs() -> None:
    for name in ("celery.worker.strategy", "celery.app.trace"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietReconciler) for f in logger.filters):
            logger.addFilter(_QuietReconciler())

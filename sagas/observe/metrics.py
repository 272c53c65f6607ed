"""Prometheus metrics of sagas and steps, fed by a listener and served at ``/metrics``.

Counters and histograms are updated where transitions and attempts happen (workers, the web
app). With ``PROMETHEUS_MULTIPROC_DIR`` set in every process before start, prometheus-client
keeps them in files that any process aggregates: the web app's ``/metrics`` then shows the
workers' numbers too, and a prefork worker's main process serves them on
``SAGAS_METRICS_PORT``. Gauges of sagas in flight are read from the store at scrape time, so
they are right whichever process moved the saga.

The directory is emptied by the first process that uses it while no other live process does
(``claim_multiprocess_dir``): files of an earlier run would otherwise add to this run's
counters, while a worker restarted beside running ones keeps everybody's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from sagas.coordinator import HELD
from sagas.observe.listeners import (
    MessageRefused,
    RefusedEvent,
    SagaListener,
    StepAttempt,
    TransitionEvent,
)
from sagas.runtime import relay, stalls
from sagas.store.sql import Store, sagas_t, utcnow

log = logging.getLogger("sagas.metrics")

SAGA_FINAL = ("COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED")
STEP_FINAL = ("SUCCEEDED", "FAILED", "COMPENSATED", "COMPENSATION_FAILED", "SKIPPED")
IN_FLIGHT = ("PENDING", "WAITING", "RUNNING", "COMPENSATING", "COMPENSATION_FAILED",
             "FORWARD_FAILED")
_LONG = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600, float("inf"))

SAGAS_STARTED = Counter("sagas_started_total", "Sagas started", ["saga"])
SAGAS_FINISHED = Counter(
    "sagas_finished_total", "Sagas that reached a final (or parked) state", ["saga", "state"]
)
STEPS_FINISHED = Counter(
    "saga_steps_finished_total", "Steps that reached a final state", ["saga", "step", "state"]
)
STEP_RETRIES = Counter("saga_step_retries_total", "Step attempts retried", ["saga", "step"])
COMPENSATION_FAILURES = Counter(
    "saga_compensation_failures_total",
    "Compensations that failed for good (the saga parks)", ["saga", "step"],
)
EVENTS_REFUSED = Counter(
    "sagas_events_refused_total",
    "Events a process would not decide (it lacks the instance's saga version), by reason",
    ["saga", "version", "reason"],
)
POISON_MESSAGES = Counter(
    "sagas_poison_messages_total",
    "Messages a worker refused as poison and dead-lettered (see `sagas dead`), by reason",
    ["reason"],
)
RECOVERIES = Counter(
    "saga_recoveries_total",
    "Work re-driven by the reconciler: a stalled step re-published, or an unstarted saga started",
    ["saga"],
)
STEP_DURATION = Histogram(
    "saga_step_duration_seconds", "Run time of one step attempt", ["saga", "step", "outcome"]
)
COMPENSATION_DURATION = Histogram(
    "saga_compensation_duration_seconds", "Run time of one compensation attempt",
    ["saga", "step", "outcome"],
)
SAGA_DURATION = Histogram(
    "saga_duration_seconds", "Start to final (or parked) state", ["saga", "state"],
    buckets=_LONG,
)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _labelled(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per label set (a hot-path saving: labels()
    validates and locks on every call)."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


class MetricsListener(SagaListener):
    """Counts transitions and times attempts; a few microseconds per call."""

    def on_event_refused(self, event: RefusedEvent) -> None:
        _labelled(EVENTS_REFUSED, event.saga, str(event.version), event.reason).inc()

    def on_message_refused(self, event: MessageRefused) -> None:
        _labelled(POISON_MESSAGES, event.reason).inc()

    def on_saga_transition(self, event: TransitionEvent) -> None:
        if event.to_state == "RUNNING" and event.from_state in ("PENDING", "WAITING"):
            _labelled(SAGAS_STARTED, event.saga).inc()
            if event.cause == "Redrive":  # recovery started a saga nobody had started
                _labelled(RECOVERIES, event.saga).inc()
        elif event.to_state in SAGA_FINAL:
            _labelled(SAGAS_FINISHED, event.saga, event.to_state).inc()
            if event.duration is not None:
                _labelled(SAGA_DURATION, event.saga, event.to_state).observe(event.duration)

    def on_step_transition(self, event: TransitionEvent) -> None:
        step = event.step or ""
        if event.to_state in STEP_FINAL:
            _labelled(STEPS_FINISHED, event.saga, step, event.to_state).inc()
            if event.to_state == "COMPENSATION_FAILED":
                _labelled(COMPENSATION_FAILURES, event.saga, step).inc()
        elif event.to_state == event.from_state and event.cause == "StepRetrying":
            _labelled(STEP_RETRIES, event.saga, step).inc()
        if (event.cause == "Redrive" and event.from_state == event.to_state
                and event.error != HELD):  # a hold sends nothing
            _labelled(RECOVERIES, event.saga).inc()

    def after_attempt(self, attempt: StepAttempt) -> None:
        duration = attempt.duration
        if duration is None:
            return
        hist = COMPENSATION_DURATION if attempt.phase == "compensation" else STEP_DURATION
        _labelled(hist, attempt.saga, attempt.step, attempt.outcome or "failed").observe(duration)


StoreSource = Callable[[], Store]
_in_flight_source: StoreSource | None = None


def count_in_flight_of(source: StoreSource | None, *, replace: bool = True) -> None:
    """The store whose sagas ``sagas_in_flight`` counts at scrape time (the web app's engine)."""
    global _in_flight_source
    if replace or _in_flight_source is None:
        _in_flight_source = source


class InFlightCollector(Collector):
    """The gauges read from the store at scrape time: ``sagas_in_flight{state}`` (one indexed
    GROUP BY), ``sagas_stalled{saga}`` (live sagas that look stalled, see
    ``sagas.runtime.stalls``) and ``sagas_outbox_pending`` (the relay's backlog)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if _in_flight_source is None:
            return
        gauge = GaugeMetricFamily(
            "sagas_in_flight", "Sagas not finished, per state (parked included)", labels=["state"]
        )
        try:
            store = _in_flight_source()
            counts = in_flight_counts(store)
        except Exception as exc:  # a scrape must not fail because the database blinked
            log.warning("sagas_in_flight unavailable: %s", exc)
            return
        for state in IN_FLIGHT:
            gauge.add_metric([state], counts.get(state, 0))
        yield gauge
        yield from _store_gauges(store)


def _store_gauges(store: Store) -> Iterator[GaugeMetricFamily]:
    try:
        stalled = stalls.stalled_counts(store, utcnow())
        pending = relay.stats(store).pending
    except Exception as exc:
        log.warning("sagas_stalled / sagas_outbox_pending unavailable: %s", exc)
        return
    gauge = GaugeMetricFamily(
        "sagas_stalled", "Live sagas making no progress: past their deadline, or re-driven or "
        "held (message still queued) by recovery since", labels=["saga"],
    )
    for name, count in sorted(stalled.items()):
        gauge.add_metric([name], count)
    yield gauge
    yield GaugeMetricFamily(
        "sagas_outbox_pending", "Saga log rows the outbox relay has not published yet",
        value=pending,
    )


def in_flight_counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute(
            select(sagas_t.c.state, func.count())
            .where(sagas_t.c.state.in_(IN_FLIGHT))
            .group_by(sagas_t.c.state)
        ).all()
    return {r[0]: int(r[1]) for r in rows}


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_LOCK_NAME = ".sagas-users.lock"
_claim_fd: int | None = None


def claim_multiprocess_dir() -> bool:
    """Join the multiprocess directory; empty it first when no other live process uses it.

    Every process holds a shared ``flock`` on ``DIR/.sagas-users.lock`` for its lifetime (a
    prefork pool's children share their parent's). The first one to start, finding nobody
    holding it, briefly takes it exclusively and deletes the ``*.db`` files of an earlier run:
    so "wipe it before start" needs no script, under any process manager, and a worker
    restarted while the others run keeps their numbers. Call it before this process records a
    metric (``install`` does, when an engine is bound). Returns True when it emptied the
    directory. The directory is created if missing.
    """
    global _claim_fd
    path = multiprocess_dir()
    if not path or _claim_fd is not None:
        return False
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    emptied = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pass  # others are running: their files are this run's
    else:
        for name in os.listdir(path):
            if name.endswith(".db"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, name))
        emptied = True
        log.info("emptied the metrics directory %s of an earlier run's files", path)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process is emptying it
    _claim_fd = fd
    return emptied


def scrape_registry() -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else this process."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        registry.register(InFlightCollector())
        return registry
    _ensure_in_flight_registered()
    return REGISTRY


_in_flight_registered = False


def _ensure_in_flight_registered() -> None:
    global _in_flight_registered
    if not _in_flight_registered:
        REGISTRY.register(InFlightCollector())
        _in_flight_registered = True


def render() -> bytes:
    return generate_latest(scrape_registry())


# --- workers -------------------------------------------------------------------------------
_served = False


def serve_worker_metrics(port: int | None, addr: str = "0.0.0.0") -> bool:
    """In a worker's main process: serve the pool's aggregated metrics on ``port``."""
    global _served
    if not port or _served:
        return False
    if not multiprocess_dir():
        log.warning("SAGAS_METRICS_PORT without PROMETHEUS_MULTIPROC_DIR: prefork children's "
                    "metrics are invisible; see README, Metrics")
    try:
        start_http_server(port, addr=addr, registry=scrape_registry())
    except OSError as exc:  # e.g. another worker on this host took the port: serve on
        log.error("worker metrics not served on %s:%s: %s (give each worker on a host its own "
                  "SAGAS_METRICS_PORT)", addr, port, exc)
        return False
    _served = True
    log.info("worker metrics on %s:%s/metrics", addr, port)
    return True


def mark_process_dead(pid: int | None = None) -> None:
    """Let a dead pool child's live gauges go (prometheus-client's multiprocess contract)."""
    if multiprocess_dir():
        try:
            multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
        except Exception as exc:
            log.debug("mark_process_dead: %s", exc)


def sample(name: str, labels: dict[str, str] | None = None, registry: Any = None) -> float:
    """One sample's value (0 when absent): handy in tests and health checks."""
    value = (registry or scrape_registry()).get_sample_value(name, labels or {})
    return float(value or 0.0)

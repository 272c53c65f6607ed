"""Switching observability on for a binding: the listeners its settings name, worker hooks.

Kept apart from ``sagas.observe.listeners`` so the listener registry imports no listener: this
module knows the built-ins (``metrics``, ``json_log``, ``tracing``) and builds them by name.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from celery.signals import worker_process_shutdown, worker_ready

from sagas.observe import listeners, metrics, tracing
from sagas.observe.listeners import JsonLogListener, SagaListener
from sagas.settings import SagaSettings

log = logging.getLogger("sagas.listeners")


def build_listener(name: str) -> SagaListener:
    """A built-in by name, or ``module:Class`` of the application's own."""
    if name == "json_log":
        return JsonLogListener(stream=sys.stderr)  # one JSON object per line, nothing around it
    if name == "metrics":
        return metrics.MetricsListener()
    if name == "tracing":
        return tracing.TracingListener()
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"unknown listener {name!r}: use a built-in name or module:Class")
    listener = getattr(importlib.import_module(module), attr)()
    if not isinstance(listener, SagaListener):
        raise TypeError(f"listener {name!r} is not a SagaListener")
    return listener


def listeners_named(names: str) -> list[SagaListener]:
    """The listeners a comma-separated ``SAGAS_LISTENERS`` names, plus tracing when OTEL is on."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if tracing.configure_from_env() and "tracing" not in wanted:
        wanted.append("tracing")
    built: list[SagaListener] = []
    for name in dict.fromkeys(wanted):
        try:
            built.append(build_listener(name))
        except Exception:
            log.exception("listener %r could not be set up; it is left out", name)
    return built


def install(settings: SagaSettings, store: metrics.StoreSource, *, key: str) -> None:
    """Configure this process's listeners from ``settings`` and hook the worker's lifecycle.

    ``store`` is what a worker's ``/metrics`` counts ``sagas_in_flight`` in (the first engine
    bound in the process, unless a web app names its own).
    """
    metrics.claim_multiprocess_dir()
    listeners.configure(lambda: listeners_named(settings.sagas_listeners), key=key)
    metrics.count_in_flight_of(store, replace=False)

    def serve_metrics(sender: Any = None, **_: Any) -> None:
        metrics.serve_worker_metrics(settings.sagas_metrics_port)

    worker_ready.connect(serve_metrics, weak=False, dispatch_uid="sagas.metrics.worker_ready")
    worker_process_shutdown.connect(
        _process_shutdown, weak=False, dispatch_uid="sagas.observe.process_shutdown"
    )


def _process_shutdown(pid: int | None = None, **_: Any) -> None:
    tracing.shutdown()
    metrics.mark_process_dead()

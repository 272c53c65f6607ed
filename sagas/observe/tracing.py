"""OpenTelemetry traces: one trace per saga, a span per step attempt and per compensation.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``console``, ``otlp``, or any installed
exporter entry point), or ``enable()`` is called with a tracer provider. The saga's root span is
made where the saga starts; its W3C context travels in every step message's headers (and in the
failure handler's), and each worker parents its attempt span on it. Workers pass the same
context on to the steps they publish, so every span of a saga lands in one trace, as siblings
under the root. Work re-published by recovery carries no context and starts its own trace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import Any

from celery.signals import task_postrun, task_prerun
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sagas.observe import listeners
from sagas.observe.listeners import SagaListener, StepAttempt, TransitionEvent

log = logging.getLogger("sagas.tracing")

ENABLED = False  # read by dispatch on every publish: a plain bool costs nothing when off
_tracer: trace.Tracer | None = None
_provider: Any = None
_configured_pid: int | None = None
# (saga id, carrier) of the saga whose work this thread is doing right now.
_carrier: ContextVar[tuple[str, dict[str, str]] | None] = ContextVar("sagas_trace", default=None)

COORDINATOR_TASKS = ("sagas.step_failed", "sagas.step_succeeded")
SETTLED = ("COMPLETED", "COMPENSATED", "COMPENSATION_FAILED", "FORWARD_FAILED")


def enable(provider: Any = None, *, register: bool = True) -> None:
    """Trace sagas with ``provider`` (default: the global tracer provider)."""
    global ENABLED, _tracer, _provider
    _provider = provider
    _tracer = (provider or trace.get_tracer_provider()).get_tracer("sagas")
    ENABLED = True
    _wire_coordinator_hooks(True)
    if register:
        listeners.ensure(TracingListener)


def disable() -> None:
    global ENABLED, _tracer, _provider, _configured_pid
    ENABLED = False
    _tracer = None
    _provider = None
    _configured_pid = None
    _wire_coordinator_hooks(False)
    listeners.discard(TracingListener)


def _one_line_console() -> Any:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    # One JSON object per line on the real stdout (Celery redirects sys.stdout to its logger).
    return ConsoleSpanExporter(
        out=sys.__stdout__ or sys.stdout,
        formatter=lambda span: span.to_json(indent=None) + os.linesep,
    )


def _exporter(name: str) -> Any:
    if name == "console":
        return _one_line_console()
    if name == "otlp":
        protocol = os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        ) or "http/protobuf"
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        raise LookupError(
            f"no OpenTelemetry trace exporter named {name!r} is installed "
            "(for OTLP: pip install opentelemetry-exporter-otlp)"
        )
    return found[0].load()()


def configure_from_env(environ: dict[str, str] | None = None) -> bool:
    """Set tracing up from the standard ``OTEL_*`` variables; False (and no cost) when off."""
    global _configured_pid
    env = os.environ if environ is None else environ
    if ENABLED and _configured_pid in (None, os.getpid()):
        return True  # enabled in code, or already set up in this very process
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "sagas"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        try:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        except Exception as exc:
            log.error("tracing exporter %r unavailable: %s", name, exc)
    _configured_pid = os.getpid()
    enable(provider, register=False)  # listeners.configure() adds the listener itself
    return True


def shutdown() -> None:
    """Flush spans before a process goes (pool children exit without atexit)."""
    provider = _provider
    if provider is not None and hasattr(provider, "force_flush"):
        try:
            provider.force_flush(5000)
        except Exception as exc:
            log.debug("flushing spans failed: %s", exc)


# --- context in headers --------------------------------------------------------------------
def headers_for(saga_id: str) -> dict[str, str] | None:
    """Trace headers for a message of ``saga_id``; None when this thread has no context."""
    current = _carrier.get()
    if current is not None and current[0] == saga_id:
        return current[1]
    return None


def _carrier_from_request(request: Any) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key in ("traceparent", "tracestate"):
        value = getattr(request, key, None)
        if value is None and isinstance(getattr(request, "headers", None), dict):
            value = request.headers.get(key)
        if isinstance(value, str):
            carrier[key] = value
    return carrier


def _coordinator_prerun(sender: Any = None, task: Any = None, args: Any = None,
                        **_: Any) -> None:
    if task is None or task.name not in COORDINATOR_TASKS or not args or len(args) < 2:
        return
    carrier = _carrier_from_request(task.request)
    if carrier:
        _carrier.set((str(args[1]), carrier))


def _coordinator_postrun(sender: Any = None, task: Any = None, **_: Any) -> None:
    if task is not None and task.name in COORDINATOR_TASKS:
        _carrier.set(None)


def _wire_coordinator_hooks(on: bool) -> None:
    for signal, receiver in ((task_prerun, _coordinator_prerun),
                             (task_postrun, _coordinator_postrun)):
        uid = f"sagas.observe.tracing.{signal.name}"
        if on:
            signal.connect(receiver, weak=False, dispatch_uid=uid)
        else:
            signal.disconnect(receiver, dispatch_uid=uid)


# --- the listener ----------------------------------------------------------------------------
def _attrs(saga_id: str, saga: str, step: str | None = None, **more: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"saga.id": saga_id, "saga.name": saga}
    if step is not None:
        attrs["saga.step"] = step
    attrs.update({k: v for k, v in more.items() if v is not None})
    return attrs


class TracingListener(SagaListener):
    """Root span at saga start, a span per attempt in the worker, a mark when the saga ends."""

    def on_saga_transition(self, event: TransitionEvent) -> None:
        tracer = _tracer
        if tracer is None:
            return
        if event.from_state == "PENDING":
            # The root: a child of whatever is current (an HTTP request, a start task).
            span = tracer.start_span(
                f"saga {event.saga}", kind=SpanKind.INTERNAL,
                attributes=_attrs(event.saga_id, event.saga, **{"saga.state": event.to_state}),
            )
            carrier: dict[str, str] = {}
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            span.end()
            _carrier.set((event.saga_id, carrier))
            return
        carrier_now = headers_for(event.saga_id)
        if event.to_state in SETTLED or event.to_state == "COMPENSATING":
            parent = propagate.extract(carrier_now) if carrier_now else None
            span = tracer.start_span(
                f"saga {event.saga} {event.to_state}", context=parent,
                attributes=_attrs(event.saga_id, event.saga, None, **{
                    "saga.state": event.to_state, "saga.error": event.error,
                    "saga.duration_s": event.duration,
                }),
            )
            if event.to_state in ("COMPENSATION_FAILED", "FORWARD_FAILED"):
                span.set_status(Status(StatusCode.ERROR, event.error or "parked"))
            span.end()

    def before_attempt(self, attempt: StepAttempt) -> None:
        tracer = _tracer
        if tracer is None:
            return
        carrier = _carrier_from_request(attempt.task.request)
        if carrier:
            _carrier.set((attempt.saga_id, carrier))
        parent = propagate.extract(carrier) if carrier else otel_context.Context()
        verb = "compensate" if attempt.phase == "compensation" else "step"
        span = tracer.start_span(
            f"{verb} {attempt.step}", context=parent, kind=SpanKind.CONSUMER,
            attributes=_attrs(
                attempt.saga_id, attempt.saga, attempt.step,
                **{"saga.phase": attempt.phase, "saga.attempt": attempt.attempt,
                   "celery.task_id": attempt.task_id,
                   "celery.task_name": getattr(attempt.task, "name", None)},
            ),
        )
        attempt.extras["otel_span"] = span
        attempt.extras["otel_token"] = otel_context.attach(trace.set_span_in_context(span))

    def after_attempt(self, attempt: StepAttempt) -> None:
        span = attempt.extras.pop("otel_span", None)
        token = attempt.extras.pop("otel_token", None)
        _carrier.set(None)
        if span is None:
            return
        span.set_attribute("saga.outcome", attempt.outcome or "failed")
        if attempt.error is not None:
            span.record_exception(attempt.error)
        if attempt.outcome != "succeeded":
            span.set_status(Status(StatusCode.ERROR, _describe(attempt.error) or attempt.outcome))
        span.end()
        if token is not None:
            # Detached in another context: harmless, nothing leaks.
            with contextlib.suppress(Exception):
                otel_context.detach(token)


def _describe(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def span_tree(spans: list[Any]) -> dict[str, Any]:
    """A finished-span list as {name, children} (for tests and debugging)."""
    by_parent: dict[Any, list[Any]] = {}
    for s in spans:
        parent = s.parent.span_id if s.parent is not None else None
        by_parent.setdefault(parent, []).append(s)

    def node(s: Any) -> dict[str, Any]:
        kids = sorted(by_parent.get(s.context.span_id, []), key=lambda k: k.start_time)
        return {"name": s.name, "children": [node(k) for k in kids]}

    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]
    return {"roots": [node(r) for r in sorted(roots, key=lambda r: r.start_time)]}


def add_headers(options: dict[str, Any], saga_id: str) -> None:
    """Put the saga's trace context on a step message and on its callbacks' messages."""
    headers = headers_for(saga_id)
    if not headers:
        return
    options["headers"] = dict(headers)
    for key in ("link", "link_error"):
        callback = options.get(key)
        if callback is not None:
            callback.set(headers=dict(headers))

"""Traces and metrics of real sagas run by real workers."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, format_span_id, format_trace_id

from config import app
from sagas.observe import metrics, tracing
from tests.conftest import Backend, wait_for_saga
from tests.support import obs_sagas
from tests.support.engine import start_saga
from tests.support.services import free_port
from tests.support.workers import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    yield exporter
    tracing.disable()


@pytest.fixture
def private_saga_queue(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Failure callbacks go to a queue only this test's worker serves."""
    from config import engine

    previous = engine.settings
    engine.settings = previous.model_copy(update={"saga_queue": "obs_saga"})
    yield "obs_saga"
    engine.settings = previous


def test_one_trace_per_saga_with_a_span_per_attempt_and_per_compensation(
    engine_backend: Backend, spans: InMemorySpanExporter, private_saga_queue: str
):
    with start_worker(app, pool="solo", perform_ping_check=False,
                      queues=[obs_sagas.TRACE_QUEUE, private_saga_queue]):
        saga_id = start_saga(obs_sagas.traced, {"plan": {"b": {"transient": 1},
                                                         "c": {"fail": True}}})
        view = wait_for_saga(saga_id)
        time.sleep(0.3)  # the last attempt's span ends just after its transition commits
    assert view["state"] == "COMPENSATED"
    finished = [s for s in spans.get_finished_spans() if s.attributes.get("saga.id") == saga_id]
    roots = [s for s in finished if s.parent is None]
    assert [r.name for r in roots] == ["saga t_traced"]
    root = roots[0]
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}, "one trace"
    children = sorted((s for s in finished if s.parent is not None), key=lambda s: s.start_time)
    assert all(s.parent.span_id == root.context.span_id for s in children)
    attempts = [(s.name, s.attributes.get("saga.attempt"), s.status.status_code)
                for s in children if s.name.startswith(("step", "compensate"))]
    assert attempts == [
        ("step a", 1, StatusCode.UNSET),
        ("step b", 1, StatusCode.ERROR),  # transient: retried
        ("step b", 2, StatusCode.UNSET),
        ("step c", 1, StatusCode.ERROR),  # business failure
        ("compensate b", 1, StatusCode.UNSET),
        ("compensate a", 1, StatusCode.UNSET),
    ]
    assert {s.attributes["saga.step"] for s in children if "saga.step" in s.attributes} == {
        "a", "b", "c"}
    assert [s.name for s in children if not s.name.startswith(("step", "compensate"))] == [
        "saga t_traced COMPENSATING", "saga t_traced COMPENSATED"]


def console_spans(log: str) -> list[dict[str, Any]]:
    out = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith('{"name"'):
            out.append(json.loads(line))
    return out


@pytest.fixture
def observed_worker(engine_backend: Backend, tmp_path: Path) -> Iterator[tuple[WorkerProcess, int]]:
    """A prefork worker configured as the docs say: OTEL env vars and multiprocess metrics."""
    port = free_port()
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = dict(engine_backend.env)
    env.update(
        SAGAS_IMPORTS="tests.support.test_sagas,tests.support.obs_sagas",
        OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="obs-worker",
        OTEL_BSP_SCHEDULE_DELAY="100", PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
        SAGAS_METRICS_PORT=str(port),
    )
    worker = WorkerProcess(env, queues=obs_sagas.XPROC_QUEUE, concurrency=2, name="observed",
                           log_dir=tmp_path).start()
    worker.wait_ready()
    yield worker, port
    worker.stop()


def test_trace_context_crosses_processes_and_prefork_metrics_are_served(
    observed_worker: tuple[WorkerProcess, int], spans: InMemorySpanExporter
):
    worker, port = observed_worker
    saga_id = start_saga(obs_sagas.cross_process, {})
    assert wait_for_saga(saga_id)["state"] == "COMPLETED"
    root = next(s for s in spans.get_finished_spans()
                if s.attributes.get("saga.id") == saga_id and s.parent is None)
    deadline = time.monotonic() + 15
    remote: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        remote = [s for s in console_spans(worker.log())
                  if s["attributes"].get("saga.id") == saga_id]
        if {s["name"] for s in remote} >= {"step a", "step b"}:
            break
        time.sleep(0.2)
    steps = sorted((s for s in remote if s["name"].startswith("step")), key=lambda s: s["name"])
    assert [s["name"] for s in steps] == ["step a", "step b"], worker.log()[-3000:]
    for s in steps:
        assert s["context"]["trace_id"] == f"0x{format_trace_id(root.context.trace_id)}"
        assert s["parent_id"] == f"0x{format_span_id(root.context.span_id)}"
        assert s["resource"]["attributes"]["service.name"] == "obs-worker"

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    finished = re.search(
        r'saga_steps_finished_total\{saga="t_xproc",state="SUCCEEDED",step="b"\} (\S+)', text)
    assert finished and float(finished.group(1)) >= 1, text[:2000]
    timed = re.search(
        r'saga_step_duration_seconds_count\{outcome="succeeded",saga="t_xproc",step="a"\} (\S+)',
        text)
    assert timed and float(timed.group(1)) >= 1
    assert 'sagas_in_flight{state="RUNNING"}' in text


def test_metrics_route_exposes_counters_and_in_flight_gauges(engine_backend: Backend):
    from config import engine
    from sagas.ops.api import metrics_router

    web = FastAPI()
    web.include_router(metrics_router(engine))
    client = TestClient(web)
    before = metrics.sample("sagas_started_total", {"saga": "t_linear"})
    from tests.support import test_sagas as ts

    wait_for_saga(start_saga(ts.linear, {}))
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    started = re.search(r'sagas_started_total\{saga="t_linear"\} (\S+)', resp.text)
    assert started and float(started.group(1)) == before + 1
    for state in metrics.IN_FLIGHT:
        assert f'sagas_in_flight{{state="{state}"}}' in resp.text


def test_a_prefork_workers_json_log_lines_parse_as_json_lines(engine_backend: Backend,
                                                               tmp_path: Path):
    """SAGAS_LISTENERS=json_log on a real worker: each transition is a line of its own that a log
    shipper parses as JSON, not wrapped in Celery's "[time: INFO/ForkPoolWorker-1] ..."."""
    env = dict(engine_backend.env, SAGAS_LISTENERS="json_log",
               SAGAS_IMPORTS="tests.support.test_sagas,tests.support.obs_sagas")
    worker = WorkerProcess(env, queues=obs_sagas.XPROC_QUEUE, concurrency=2, name="jsonlog",
                           log_dir=tmp_path).start()
    try:
        worker.wait_ready()
        saga_id = start_saga(obs_sagas.cross_process, {})
        assert wait_for_saga(saga_id)["state"] == "COMPLETED"
        deadline = time.monotonic() + 15
        mine: list[str] = []
        while time.monotonic() < deadline:
            # Celery's own lines name the saga too (in task ids): the listener's carry its key.
            mine = [line for line in worker.log().splitlines() if f'"saga_id":"{saga_id}"' in line]
            if sum('"to":"SUCCEEDED"' in line for line in mine) >= 2:
                break
            time.sleep(0.2)
    finally:
        worker.stop()
    assert mine, worker.log()[-3000:]
    parsed = [json.loads(line) for line in mine]  # the whole line, nothing around it
    assert all(line.startswith("{") for line in worker.log().splitlines() if '"saga_id"' in line)
    assert {(p["step"], p["to"]) for p in parsed} >= {("a", "SUCCEEDED"), ("b", "SUCCEEDED")}
    assert all(p["saga_id"] == saga_id and p["saga"] == "t_xproc" for p in parsed)

"""Redeploys on real workers: sagas in flight keep their version; a worker without it refuses.

The workers are ``celery -A tests.support.versioned:app worker`` subprocesses, each deploy
registering the versions ``VERSIONED_REGISTER`` names (see ``tests/support/versioned.py``). A
deploy is stopped as Kubernetes or systemd (``KillMode=mixed``) stop one: SIGTERM to the worker's
main process, a warm shutdown in which the tasks running finish. The last test runs the engine
on pytest-celery's ``celery_app`` and a worker thread instead (see ``tests/README.md``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from sagas import BusinessError, Sagas, SagaSettings, SagaState, Step, StepContext, StepState
from sagas.definition import Saga
from tests.conftest import private_broker
from tests.support.services import RedisServer, free_port
from tests.support.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.integration

APP = "tests.support.versioned:app"
SAGAS = str(Path(sys.executable).parent / "sagas")
SLOW = 2.5  # b's sleep: long enough to redeploy while every saga is in flight on it
SETTLED = {"COMPLETED", "COMPENSATED", "COMPENSATION_FAILED"}


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(every)


class Deploy:
    """The workers of one deploy: each registers the same versions (``VERSIONED_REGISTER``)."""

    def __init__(self, env: dict[str, str], register: str, log_dir: Path, count: int = 2,
                 concurrency: int = 5, extra_env: list[dict[str, str]] | None = None) -> None:
        self.register = register
        label = register.replace(",", "+")
        self.workers = [
            WorkerProcess(
                dict(env, VERSIONED_REGISTER=register, **(extra_env[i] if extra_env else {})),
                queues="versioned,saga", concurrency=concurrency, name=f"v{label}-{i}",
                log_dir=log_dir, app=APP,
            )
            for i in range(count)
        ]

    def start(self) -> Deploy:
        for worker in self.workers:
            worker.start()
        for worker in self.workers:
            worker.wait_ready(60)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown: SIGTERM to each main process only. (``WorkerProcess.stop`` signals the
        whole process group, and prefork children die on SIGTERM with the task they run.)"""
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                os.kill(worker.process.pid, signal.SIGTERM)
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.stop()  # the whole group, hard
            else:
                worker.stop()  # no-op once the main process exited

    def log(self) -> str:
        return "\n".join(w.log() for w in self.workers)


@dataclass
class Redeploys:
    versioned: ModuleType
    env: dict[str, str]
    log_dir: Path
    deploys: list[Deploy] = field(default_factory=list)

    def deploy(self, register: str, **kw: Any) -> Deploy:
        deploy = Deploy(self.env, register, self.log_dir, **kw).start()
        self.deploys.append(deploy)
        return deploy

    def view(self, saga_id: str) -> dict[str, Any]:
        return self.versioned.engine.store.get_view(saga_id)  # type: ignore[no-any-return]

    def steps(self, saga_id: str) -> dict[str, str]:
        return {s["name"]: s["state"] for s in self.view(saga_id)["steps"]}

    def settled(self, saga_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        engine = self.versioned.engine
        wait_until(lambda: set(engine.store.saga_states(saga_ids).values()) <= SETTLED
                   and len(engine.store.saga_states(saga_ids)) == len(saga_ids),
                   timeout, f"sagas settled: {engine.store.saga_states(saga_ids)}", every=0.2)
        return {i: self.view(i) for i in saga_ids}

    def cli(self, register: str, *args: str) -> Any:
        """``sagas -A tests.support.versioned:app ARGS --json`` in a process registering
        ``register``, as an operator runs it from a machine with the new code."""
        result = subprocess.run(
            [SAGAS, "-A", APP, *args, "--json"], cwd=ROOT, capture_output=True, text=True,
            env=dict(self.env, VERSIONED_REGISTER=register), timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def redeploys(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[Redeploys]:
    root = tmp_path_factory.mktemp("redeploy")
    env = {
        "VERSIONED_REDIS": redis_server.url_db(3),
        "VERSIONED_BROKER": private_broker("redeploy", 3),
        "VERSIONED_DB": f"sqlite:///{root}/versioned.db",
        # A step without a time limit is stalled 3 s after its dispatch; recovery re-drives it
        # on its first pass after that.
        "STEP_TIMEOUT": "3", "RECOVERY_GRACE": "0",
    }
    # This process is the producer and the test's eyes: it registers both versions. The
    # settings are read at import, and not left behind for the rest of the session.
    with environment(dict(env, VERSIONED_REGISTER="1,2")):
        versioned = importlib.import_module("tests.support.versioned")
    assert env["VERSIONED_DB"] == versioned.DATABASE_URL, "imported before this fixture"
    versioned.engine.upgrade_schema()
    versioned.ledger().flushdb()
    worker_env = dict(os.environ, **env, PYTHONPATH=str(ROOT))
    worker_env.pop("SAGAS_IMPORTS", None)
    worker_env.pop("BROKER_URL", None)  # `celery` would take it over the app's own broker
    worker_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker_env.pop("SAGAS_METRICS_PORT", None)
    state = Redeploys(versioned, worker_env, root)
    try:
        yield state
    finally:
        for deploy in state.deploys:
            for worker in deploy.workers:
                worker.stop()


@pytest.fixture(autouse=True)
def stop_this_tests_deploys(redeploys: Redeploys) -> Iterator[None]:
    """A failing test must not leave its workers consuming the next test's messages."""
    before = len(redeploys.deploys)
    yield
    for deploy in redeploys.deploys[before:]:
        for worker in deploy.workers:
            worker.stop()


def started_b_on(redeploys: Redeploys, saga_ids: list[str], register: str) -> int:
    return sum(f"action:b@{register}" in redeploys.versioned.calls(i) for i in saga_ids)


def test_v1_sagas_in_flight_finish_on_v1_after_a_redeploy_that_adds_v2(redeploys: Redeploys):
    v = redeploys.versioned
    failing = {3, 9, 16}
    # Started before any worker is up, so every a waits in the queue ahead of every b: however
    # slow this machine starts sagas, all twenty are at b before the first b ends.
    ids = [
        v.engine.start(v.NAME, {"n": n, "plan": {"b": {"sleep": SLOW},
                                              **({"c": {"fail": True}} if n in failing else {})}},
                       version=1).id
        for n in range(20)
    ]
    old = redeploys.deploy("1")  # 2 workers x 5 processes
    # In flight on the slow step: every a done, every b dispatched, ten of them running.
    wait_until(lambda: all(redeploys.steps(i) == {"a": "SUCCEEDED", "b": "RUNNING",
                                                  "c": "PENDING"} for i in ids),
               20, "all 20 sagas at b")
    wait_until(lambda: started_b_on(redeploys, ids, "1") == 10, 20, "ten b running")
    old.stop()  # the ten b running finish there; the other ten wait in the broker
    assert not any(c.startswith("action:c") for i in ids for c in v.calls(i)), (
        "a c ran before the redeploy: the machine was too slow for SLOW")
    new = redeploys.deploy("1,2")
    views = redeploys.settled(ids, timeout=60)

    for n, saga_id in enumerate(ids):
        view, calls = views[saga_id], v.calls(saga_id)
        assert (view["version"], view["fingerprint"]) == (1, v.V1.fingerprint)
        states = {s["name"]: s["state"] for s in view["steps"]}
        assert list(states) == ["a", "b", "c"], f"v1's steps only: {states}"
        assert calls[0] == "action:a@1" and "action:c@1,2" in calls, calls
        assert not any(c.split("@")[0].endswith((":b2", ":d")) for c in calls), calls
        if n in failing:
            assert view["state"] == "COMPENSATED", view
            assert states == {"a": "COMPENSATED", "b": "COMPENSATED", "c": "FAILED"}
            undone = [c for c in calls if c.startswith("compensation:")]
            assert undone == ["compensation:b@1,2", "compensation:a@1,2"], calls
            compensated = [e["step"] for e in view["events"] if e["to_state"] == "COMPENSATED"
                           and e["step"]]
            assert compensated == ["b", "a"], "newest first"
        else:
            assert view["state"] == "COMPLETED", view
            assert set(states.values()) == {"SUCCEEDED"}
            results = view["context"]["results"]
            assert {r["version"] for r in results.values()} == {1}
            assert results["c"]["ran_on"] == "1,2", "decided with v1 on the new deploy"
            assert not any(c.startswith("compensation:") for c in calls), calls
    assert started_b_on(redeploys, ids, "1") == 10 and started_b_on(redeploys, ids, "1,2") == 10

    # New starts run v2: from this process, and by name through the new deploy's start task.
    fresh = [v.engine.start(v.NAME, {"plan": {}}).id,
             v.engine.start(v.NAME, {"plan": {"d": {"fail": True}}}).id,
             v.app.tasks["sagas.start"].apply_async(args=(v.NAME, {"plan": {}})).id]
    fresh_views = redeploys.settled(fresh, timeout=30)
    for view in fresh_views.values():
        assert (view["version"], view["fingerprint"]) == (2, v.V2.fingerprint)
        assert [s["name"] for s in view["steps"]] == ["a", "b2", "c", "d"]
    assert [fresh_views[i]["state"] for i in fresh] == ["COMPLETED", "COMPENSATED", "COMPLETED"]
    assert [c for c in v.calls(fresh[1]) if c.startswith("compensation:")] == [
        "compensation:c@1,2", "compensation:b2@1,2", "compensation:a@1,2"]

    new.stop()
    logs = old.log() + new.log()
    for bad in ("KeyError", "Traceback", "changed its graph", "no version 1 of saga"):
        assert bad not in logs, f"{bad!r} in the workers' logs"


def refused_metric(port: int) -> dict[tuple[str, str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.labels["saga"], s.labels["version"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "sagas_events_refused"
        for s in family.samples if s.name == "sagas_events_refused_total"
    }


def frozen(view: dict[str, Any]) -> Any:
    """What a refused event must not change: states, steps, results, history, deadline clock."""
    return (view["state"], view["updated_at"], json.dumps(view["steps"], sort_keys=True),
            json.dumps(view["events"], sort_keys=True))


def test_a_worker_without_v1_refuses_its_events_changes_nothing_and_says_why(
    redeploys: Redeploys, tmp_path: Path
):
    v = redeploys.versioned
    in_flight_before = {x.version: x.in_flight for x in v.engine.versions()}
    old = redeploys.deploy("1", count=1, concurrency=3)
    ids = [v.engine.start(v.NAME, {"plan": {"b": {"sleep": SLOW}}}, version=1).id
           for _ in range(3)]
    wait_until(lambda: started_b_on(redeploys, ids, "1") == 3, 20, "three b running")
    old.stop()  # each b finishes there, its success recorded and c sent: no v1 worker is left

    prom = tmp_path / "prom"
    prom.mkdir()
    ports = [free_port(), free_port()]
    metrics_env = [{"PROMETHEUS_MULTIPROC_DIR": str(prom), "SAGAS_METRICS_PORT": str(p)}
                   for p in ports]
    new = redeploys.deploy("2", count=2, concurrency=2, extra_env=metrics_env)

    def line(saga_id: str) -> str:
        return (f"saga {saga_id}: step c (action) not run: this worker has no version 1 of saga "
                "'versioned'; a worker that registers it (or recovery) takes the saga over")

    wait_until(lambda: all(line(i) in new.log() for i in ids), 30, "a refusal per saga")
    before = {i: redeploys.view(i) for i in ids}
    time.sleep(3)
    after = {i: redeploys.view(i) for i in ids}
    for saga_id in ids:
        assert frozen(after[saga_id]) == frozen(before[saga_id]), "a refused event changed it"
        assert after[saga_id]["state"] == "RUNNING"
        assert redeploys.steps(saga_id) == {"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "RUNNING"}
        # The v2 worker has c's task but not v1: it runs nothing, not even the participant.
        assert v.calls(saga_id) == ["action:a@1", "action:b@1"]
        assert new.log().count(line(saga_id)) == 1, "one line per refused event"
        warning = next(ln for ln in new.log().splitlines() if line(saga_id) in ln)
        assert "WARNING" in warning, warning

    # The metric, as Prometheus scrapes it from either worker of the host.
    assert refused_metric(ports[0]) == {("versioned", "1", "unknown_version"): 3.0}
    assert refused_metric(ports[1]) == refused_metric(ports[0])

    # The operator, on a machine with the new code (v2 only), sees why.
    versions = {x["version"]: x for x in redeploys.cli("2", "versions")}
    assert versions[1] == {
        "name": "versioned", "version": 1, "fingerprint": v.V1.fingerprint,
        "in_flight": in_flight_before.get(1, 0) + 3, "total": versions[1]["total"],
        "registered": False, "changed": False,
    }
    assert versions[2]["registered"] is True and versions[2]["in_flight"] == 0
    shown = redeploys.cli("2", "show", ids[0])
    assert (shown["version"], shown["fingerprint"], shown["state"]) == (
        1, v.V1.fingerprint, "RUNNING")
    listed = redeploys.cli("2", "list", "--version", "1", "--state", "RUNNING")
    assert set(ids) <= {item["id"] for item in listed["items"]}
    assert {item["version"] for item in listed["items"]} == {1}

    # A deploy that has v1 again, and recovery on it, take the sagas over.
    new.stop()
    back = redeploys.deploy("1,2", count=1, concurrency=3)
    recover = v.app.tasks["sagas.recover_stalled"]

    def settled_after_recovery() -> bool:
        if set(v.engine.states(ids).values()) == {SagaState.COMPLETED}:
            return True
        recover.apply_async()  # beat's task, run by the deploy's worker
        return False

    wait_until(settled_after_recovery, 30, "re-driven to COMPLETED", every=2)
    for saga_id in ids:
        view = redeploys.view(saga_id)
        assert [s["name"] for s in view["steps"]] == ["a", "b", "c"]
        assert view["context"]["results"]["c"] == {"step": "c", "version": 1, "ran_on": "1,2"}
        assert v.calls(saga_id)[-1] == "action:c@1,2", "re-driven with the same key"
    assert "made no progress past its deadline: re-driven" in back.log()
    versions = {x["version"]: x for x in redeploys.cli("2", "versions")}
    assert versions[1]["in_flight"] == in_flight_before.get(1, 0), "v1 can go from the code"
    back.stop()


# --- pytest-celery: the ecosystem's fixtures, a worker thread, the private Redis -----------------

PAIR_QUEUE = "pair"
PAIR_SAGA_QUEUE = "pair_saga"


@pytest.fixture(scope="session")
def celery_config(redis_server: RedisServer) -> dict[str, Any]:
    """``celery_app``'s configuration: the session's private Redis (and its RabbitMQ vhost as the
    broker, under SAGAS_TEST_BROKER=rabbitmq), not the memory transport,
    since a failure reaches the engine through a ``link_error`` message and the result backend."""
    url = redis_server.url_db(4)
    return {
        "broker_url": private_broker("kit", 4), "result_backend": url, "task_serializer": "json",
        "result_serializer": "json", "accept_content": ["json"], "task_acks_late": True,
        "worker_prefetch_multiplier": 1, "broker_connection_retry_on_startup": True,
    }


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    # "celery" serves the worker's start-up ping (celery.ping, on the default queue).
    return {"queues": ("celery", PAIR_QUEUE, PAIR_SAGA_QUEUE)}


@pytest.fixture
def pair(celery_app: Celery, tmp_path: Path) -> Sagas:
    """The engine bound to ``celery_app``, with v1 (reserve, charge) and v2 (... notify)."""
    engine = Sagas(celery_app, SagaSettings(
        database_url=f"sqlite:///{tmp_path}/pair.db",
        redis_url=str(celery_app.conf.result_backend),
        broker_url=str(celery_app.conf.broker_url),
        saga_queue=PAIR_SAGA_QUEUE, sagas_listeners="",
    ))
    engine.upgrade_schema()

    @celery_app.task(name="pair.act")
    def act(ctx: dict[str, Any]) -> dict[str, Any]:
        step = StepContext.model_validate(ctx)
        if step.input.get("fail") == step.step:
            raise BusinessError(f"{step.step} declined")
        return {"step": step.step, "version": step.version}

    @celery_app.task(name="pair.undo")
    def undo(ctx: dict[str, Any]) -> dict[str, Any]:
        return {"undone": StepContext.model_validate(ctx).step}

    def step(name: str) -> Step:
        return Step(name, action=act, compensation=undo, queue=PAIR_QUEUE)

    engine.register(Saga("pair", [step("reserve"), step("charge")], version=1))
    engine.register(Saga("pair", [step("reserve"), step("charge"), step("notify")], version=2))
    return engine


@pytest.fixture
def celery_worker(celery_app: Celery, celery_includes: Any, celery_worker_pool: Any,
                  celery_worker_parameters: dict[str, Any], pair: Sagas) -> Iterator[Any]:
    """``celery.contrib.pytest``'s thread worker, after ``pair`` registered its tasks.

    pytest-celery 1.x's plugin re-exports ``celery.contrib.pytest`` but replaces its
    ``celery_worker`` with a Docker container per test; this is the original, unchanged.
    """
    from celery.contrib.testing import worker

    for module in celery_includes:
        celery_app.loader.import_task_module(module)
    with worker.start_worker(celery_app, pool=celery_worker_pool,
                             **celery_worker_parameters) as started:
        yield started


def test_the_engine_runs_on_pytest_celerys_app_and_worker_thread(pair: Sagas,
                                                                 celery_worker: Any):
    v1 = pair.start("pair", {}, version=1)
    v2 = pair.start("pair", {})
    declined = pair.start("pair", {"fail": "charge"}, version=1)
    assert v1.wait(timeout=30).state is SagaState.COMPLETED
    first = v1.outcome()
    assert list(first.steps) == ["reserve", "charge"]
    assert {s.result["version"] for s in first.steps.values()} == {1}
    second = v2.wait(timeout=30)
    assert second.state is SagaState.COMPLETED
    assert list(second.steps) == ["reserve", "charge", "notify"]
    assert {s.result["version"] for s in second.steps.values()} == {2}
    third = declined.wait(timeout=30)
    assert third.state is SagaState.COMPENSATED, third
    assert {n: s.state for n, s in third.steps.items()} == {
        "reserve": StepState.COMPENSATED, "charge": StepState.FAILED}
    assert "declined" in (third.steps["charge"].error or "")

"""``Sagas(app, settings)`` on apps that are not the sample: two apps in one process, handles."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from sagas import SagaNotFoundError, SagaState, SagaTimeoutError, StepState
from tests.conftest import ON_RABBITMQ, private_broker
from tests.support.services import RedisServer
from tests.support.workers import ROOT, WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def twins(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("twins")
    env = {"TWIN_REDIS": redis_server.url, "ALPHA_DB": f"sqlite:///{root}/alpha.db",
           "BETA_DB": f"sqlite:///{root}/beta.db"}
    if ON_RABBITMQ:  # a vhost each: on Redis, databases 1 and 2
        env["TWIN_BROKERS"] = ",".join(private_broker(n, 0) for n in ("alpha", "beta"))
    os.environ.update(env)  # read when the module binds its engines, at import
    from tests.support import two_apps

    two_apps.alpha.upgrade_schema()
    two_apps.beta.upgrade_schema()
    worker_env = dict(os.environ, **env, PYTHONPATH=str(ROOT))
    worker_env.pop("SAGAS_IMPORTS", None)
    worker_env.pop("BROKER_URL", None)  # `celery` would take it over each app's own broker
    workers = [
        WorkerProcess(worker_env, queues="twin,saga", concurrency=2, name=name, log_dir=root,
                      app=f"tests.support.two_apps:{name}_app").start()
        for name in ("alpha", "beta")
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield two_apps
    finally:
        for worker in workers:
            worker.stop()


def test_two_apps_in_one_process_run_their_own_sagas_through_their_own_broker_and_store(
    twins: ModuleType,
):
    handles: dict[str, Any] = {}

    def start(name: str) -> None:
        # A thread of a web server: celery.current_app here is Celery's fallback app, which
        # would publish to AMQP on localhost; the engine publishes through its own app.
        engine = getattr(twins, name)
        handles[name] = engine.start(getattr(twins, f"{name}_twin"), {"who": name})

    threads = [threading.Thread(target=start, args=(n,)) for n in ("alpha", "beta")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alpha = handles["alpha"].wait(timeout=30)
    beta = handles["beta"].wait(timeout=30)
    assert alpha.state is SagaState.COMPLETED and beta.state is SagaState.COMPLETED
    assert list(alpha.steps) == ["one", "two"], "alpha decided with alpha's twin"
    assert list(beta.steps) == ["left", "right", "join"], "beta decided with beta's twin"
    assert {s.result["app"] for s in alpha.steps.values()} == {"alpha"}
    assert {s.result["app"] for s in beta.steps.values()} == {"beta"}
    assert beta.steps["join"].result["seen"] == ["left", "right"], "the join ran after both"
    assert twins.alpha.states([beta.id]) == {}, "alpha's store never saw beta's saga"
    assert twins.beta.states([alpha.id]) == {}, "beta's store never saw alpha's saga"


def test_a_handle_reads_many_states_in_one_query_and_times_out_with_a_clear_error(
    twins: ModuleType,
):
    done = twins.alpha.start(twins.alpha_twin, {})
    stuck = twins.alpha.start(twins.alpha_stuck, {})
    assert done.wait(timeout=30).succeeded
    with pytest.raises(SagaTimeoutError, match=f"saga {stuck.id} is still RUNNING after 0.3s"):
        stuck.wait(timeout=0.3)
    assert stuck.outcome().steps["x"].state is StepState.RUNNING, "the saga itself goes on"
    assert twins.alpha.states([done.id, stuck.id, "no-such-id"]) == {
        done.id: SagaState.COMPLETED, stuck.id: SagaState.RUNNING,
    }
    with pytest.raises(SagaNotFoundError, match="no-such-id"):
        twins.alpha.handle("no-such-id").wait(timeout=0.2)
    with pytest.raises(SagaNotFoundError):
        _ = twins.alpha.handle("no-such-id").state


def test_reads_never_wait_for_a_writer_holding_sqlites_write_lock(twins: ModuleType):
    saga = twins.alpha.start(twins.alpha_twin, {})
    saga.wait(timeout=30)
    path = twins.alpha.settings.database_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a worker mid-transition holds the write lock
    try:
        began = time.monotonic()
        assert saga.state is SagaState.COMPLETED
        assert twins.alpha.states([saga.id]) == {saga.id: SagaState.COMPLETED}
        assert twins.alpha.store.get_view(saga.id)["state"] == "COMPLETED"
        assert saga.outcome().succeeded
        assert time.monotonic() - began < 2, "a read waited for the writer (busy timeout)"
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_saga_started_by_name_through_the_engines_start_task_is_the_same_saga(
    twins: ModuleType,
):
    result = twins.alpha_app.tasks["sagas.start"].apply_async(args=("twin", {"via": "task"}))
    outcome = twins.alpha.handle(result.id).wait(timeout=30)
    assert outcome.id == result.id and outcome.state is SagaState.COMPLETED


def test_step_tasks_run_through_the_engine_without_task_cls(twins: ModuleType):
    from sagas.runtime.dispatch import INLINE_MARK

    assert "SagaTask" not in str(twins.alpha_app.task_cls), "the app kept Celery's Task"
    assert getattr(twins.alpha_app.tasks["alpha.step"], INLINE_MARK, False)
    assert getattr(twins.beta_app.tasks["beta.step"], INLINE_MARK, False)
    assert Path(twins.__file__).exists()

"""Delivery: stated settings, a bounded cap on poison tasks, duplicate starts and callbacks,
and messages our workers cannot decode, all against real workers and a real broker (Redis, or
RabbitMQ under SAGAS_TEST_BROKER=rabbitmq).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import func, select

from config import app, queues
from sagas.coordinator import IgnoreKind, StepFailed, StepRetrying, StepSucceeded
from sagas.errors import IdempotencyConflictError
from sagas.runtime.dispatch import TIME_LIMIT_HARD_MARGIN
from sagas.runtime.worker import SagaTask
from sagas.store.sql import sagas_t
from tests.chaos import crash_sagas as cs
from tests.chaos.cluster import Cluster
from tests.conftest import ON_RABBITMQ, use_database
from tests.support.engine import apply_event, get_store, start_saga
from tests.support.services import consumer_timeout_s

pytestmark = pytest.mark.integration


# --- settings ---------------------------------------------------------------------------------
def test_delivery_settings_are_at_least_once_with_a_bounded_worker_lost_cap():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_retry_on_worker_lost is True
    assert SagaTask.max_retries is not None and SagaTask.max_retries <= 5
    assert SagaTask.default_retry_delay <= 5, "a lost task is sent again promptly"
    import tasks.order_saga  # noqa: F401 - the order saga
    from config import engine

    longest = max(
        (s.time_limit or 0) + TIME_LIMIT_HARD_MARGIN
        for saga in engine.sagas.values() for s in saga.steps.values()
    )
    assert conf.broker_transport_options["visibility_timeout"] > longest
    assert "pickle" not in conf.accept_content
    if ON_RABBITMQ:
        # RabbitMQ ignores the visibility timeout; its server's consumer_timeout closes the
        # channel of a delivery unacknowledged longer: a running step (acks_late), or a retry
        # held until its countdown is due.
        countdown = max(
            p.backoff_max for saga in engine.sagas.values() for s in saga.steps.values()
            for p in (s.retry, s.compensation_retry))
        timeout = consumer_timeout_s()
        assert timeout is None or timeout > longest + countdown, (timeout, longest, countdown)


# --- duplicates, in process ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def delivery_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    previous = os.environ.get("DATABASE_URL")
    url = f"sqlite:///{tmp_path_factory.mktemp('delivery')}/sagas.db"
    use_database(url)
    from tests.conftest import _migrate

    _migrate()
    yield url
    if previous is not None:
        use_database(previous)


@pytest.fixture
def db(delivery_db: str) -> str:
    use_database(delivery_db)
    return delivery_db


def history(saga_id: str) -> tuple[str, int, list[str]]:
    view = get_store().get_view(saga_id)
    return view["state"], len(view["events"]), [s["state"] for s in view["steps"]]


def test_a_start_with_a_used_idempotency_key_returns_the_existing_saga(db: str):
    key = f"order-{uuid.uuid4()}"
    first = start_saga(cs.recovery_unit, {"n": 1}, idempotency_key=key)
    again = start_saga(cs.recovery_unit, {"n": 1}, idempotency_key=key)
    assert again == first
    with get_store().read() as conn:
        count = conn.execute(
            select(func.count()).select_from(sagas_t).where(sagas_t.c.idempotency_key == key)
        ).scalar_one()
    assert count == 1
    assert [e["to_state"] for e in get_store().get_view(first)["events"] if not e["step"]] == [
        "RUNNING"
    ], "started once"


def test_the_same_key_with_a_different_payload_is_refused_clearly(db: str):
    key = f"order-{uuid.uuid4()}"
    first = start_saga(cs.recovery_unit, {"n": 1}, idempotency_key=key)
    with pytest.raises(IdempotencyConflictError, match=f"already used by saga {first}"):
        start_saga(cs.recovery_unit, {"n": 2}, idempotency_key=key)


def test_a_start_repeated_with_the_same_saga_id_is_one_saga(db: str):
    saga_id = str(uuid.uuid4())
    assert start_saga(cs.recovery_unit, {}, saga_id=saga_id) == saga_id
    before = history(saga_id)
    assert start_saga(cs.recovery_unit, {}, saga_id=saga_id) == saga_id
    assert history(saga_id) == before


def test_callbacks_for_unknown_sagas_are_logged_and_ignored(
    db: str, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.INFO, logger="sagas"):
        decision = apply_event("no-such-saga", StepSucceeded("a", "action", {}))
    assert decision.ignored is not None
    assert decision.ignored.kind is IgnoreKind.UNKNOWN_SAGA
    assert not decision.dispatches
    assert "unknown saga no-such-saga" in caplog.text or "no-such-saga ignored" in caplog.text


def test_callbacks_for_terminal_sagas_or_steps_past_that_state_change_nothing(
    db: str, caplog: pytest.LogCaptureFixture
):
    saga_id = start_saga(cs.recovery_unit, {})
    apply_event(saga_id, StepSucceeded("a", "action", {"v": 1}))
    # Step a is past RUNNING: late or duplicate callbacks for it are ignored.
    before = history(saga_id)
    with caplog.at_level(logging.INFO, logger="sagas"):
        for event in (StepSucceeded("a", "action", {"v": 2}), StepFailed("a", "action", "late"),
                      StepRetrying("a", "action", 2, "late"), StepSucceeded("a", "compensation")):
            decision = apply_event(saga_id, event)
            assert decision.ignored and not decision.dispatches
    assert history(saga_id) == before
    assert get_store().get_view(saga_id)["context"]["results"]["a"] == {"v": 1}
    assert "ignored" in caplog.text
    apply_event(saga_id, StepSucceeded("b", "action", {}))
    terminal = history(saga_id)
    assert terminal[0] == "COMPLETED"
    for event in (StepSucceeded("b", "action", {}), StepFailed("b", "action", "late"),
                  StepFailed("a", "compensation", "late")):
        decision = apply_event(saga_id, event)
        assert decision.ignored and not decision.dispatches
    assert history(saga_id) == terminal


# --- real workers -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("delivery-cluster"))
    try:
        c.migrate()
        c.start_workers({"w": ("crashy,saga", 2)})
        yield c
    finally:
        c.stop()


def foreign_app(cluster: Cluster) -> Celery:
    """A second client of the deployment's broker; never made current in this process."""
    other = Celery("foreign", broker=cluster.broker_url, set_as_current=False)
    other.conf.update(task_queues=queues.task_queues, task_default_queue=queues.SAGA,
                      accept_content=["json", "pickle"], task_serializer="json")
    return other


def test_a_task_that_kills_its_worker_every_time_fails_after_bounded_redeliveries(
    cluster: Cluster,
):
    saga_id = cluster.client("start", "t_crashy", json.dumps({"plan": {"b": {"crash": "child"}}})
                             )["id"]
    view = cluster.wait_for(saga_id, timeout=90)
    assert view["state"] == "COMPENSATED"
    b = {s["name"]: s for s in view["steps"]}["b"]
    # A lost worker says nothing about b's effect, so b is compensated too, before a.
    assert b["state"] == "COMPENSATED"
    assert "WorkerLostError" in (b["error"] or "")
    assert cluster.calls(saga_id, "b") == 1 + SagaTask.max_retries
    assert cluster.calls(saga_id, "b", "compensation") == 1
    assert cluster.calls(saga_id, "a", "compensation") == 1
    undone = [e["step"] for e in view["events"] if e["to_state"] == "COMPENSATED" and e["step"]]
    assert undone == ["b", "a"]
    # The worker's main process survived every loss and still serves.
    assert cluster.workers["w"].process is not None and cluster.workers["w"].process.poll() is None
    after = cluster.client("start", "t_crashy", json.dumps({"plan": {}}))["id"]
    assert cluster.wait_for(after, timeout=60)["state"] == "COMPLETED"


def _publish_raw(other: Celery, body: bytes, content_type: str, headers: dict[str, Any]) -> None:
    queue = other.amqp.queues[queues.SAGA]
    with other.connection_for_write() as conn:
        conn.Producer().publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            content_type=content_type, content_encoding="utf-8", headers=headers,
        )


def test_undecodable_and_unknown_messages_are_dead_lettered_with_a_reason_and_the_worker_serves_on(
    cluster: Cluster,
):
    other = foreign_app(cluster)
    try:
        # pickle is refused by every worker (accept_content is JSON only) ...
        other.send_task("sagas.step_succeeded", args=({}, "x", "a", "action"), queue="saga",
                        serializer="pickle")
        # ... a body that is not JSON at all ...
        _publish_raw(other, b"{not json", "application/json",
                     {"task": "sagas.step_succeeded", "id": str(uuid.uuid4()), "lang": "py"})
        # ... and a task name nobody registers.
        other.send_task("no.such.task", args=(1,), queue="saga")
    finally:
        other.close()
    saga_id = cluster.client("start", "t_crashy", json.dumps({"plan": {}}))["id"]
    assert cluster.wait_for(saga_id, timeout=60)["state"] == "COMPLETED"
    deadline = time.monotonic() + 10
    log = ""
    reasons = ("poison message refused (undecodable): content type refused (accept_content)",
               "poison message refused (undecodable): cannot decode the body",
               "poison message refused (unknown_task): task 'no.such.task' is not registered")
    while time.monotonic() < deadline:
        log = cluster.logs()
        if all(r in log for r in reasons):
            break
        time.sleep(0.2)
    for reason in reasons:
        assert reason in log, f"no log line says {reason!r}"
    assert cluster.queue_depth("saga") == 0, "dead-lettered, not left to block the queue"
    assert cluster.workers["w"].process is not None and cluster.workers["w"].process.poll() is None

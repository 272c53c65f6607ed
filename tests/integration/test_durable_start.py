"""A start nothing can lose: ``start_task(...).delay(data)`` records the saga before it returns.

The burst test runs a private deployment (tests/chaos/cluster.py): a client process starts
orders with ``start_order_saga.delay(order)`` while no worker runs, the broker is wiped right
after the calls return, then workers and beat come up and every saga must end, each effect once.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery

import sagas
from sagas.store.sql import utcnow
from tests.chaos.cluster import Cluster
from tests.support.services import RedisServer

pytestmark = pytest.mark.integration

TRIP = sagas.Saga("trip", steps=[
    sagas.Step("hold", action="trip.hold", compensation="trip.release", queue="nobody"),
    sagas.Step("pay", action="trip.pay", queue="nobody"),
])


def _engine(url: str, broker: str) -> sagas.Sagas:
    app = Celery("durable-start", broker=broker)
    app.conf.update(task_serializer="json", accept_content=["json"],
                    broker_connection_retry=False, broker_connection_max_retries=0)
    engine = sagas.Sagas(app, sagas.SagaSettings(database_url=url, sagas_listeners="",
                                                 redis_url=broker))
    engine.register(TRIP)
    return engine


def test_delay_records_the_saga_and_its_first_step_before_it_returns(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    engine = _engine(f"sqlite:///{tmp_path}/s.db", redis_server.url_db(7))
    engine.upgrade_schema()
    start = engine.start_task(TRIP, name="trips.start")

    result = start.delay({"who": "ada"}, "key-1")

    outcome = engine.handle(result.id).outcome()  # no worker serves "nobody": only SQL knows
    assert outcome.state is sagas.SagaState.RUNNING
    assert outcome.steps["hold"].state is sagas.StepState.RUNNING
    queued = redis.Redis.from_url(redis_server.url_db(7)).lrange("nobody", 0, -1)
    assert any(result.id.encode() in m for m in queued), "its first step was published"
    again = start.apply_async(({"who": "ada"},), {"idempotency_key": "key-1"})
    assert again.id == result.id, "the idempotency key finds the first saga"
    with pytest.raises(sagas.IdempotencyConflictError):
        start.delay({"who": "bob"}, "key-1")
    with pytest.raises(sagas.InvalidSagaInputError):
        start.delay(["not", "an", "object"])


def test_delay_with_the_store_down_raises_a_clear_error_and_publishes_nothing(
    redis_server: RedisServer,
) -> None:
    from tests.integration.test_api import closed_port

    engine = _engine(f"postgresql+psycopg://sagas@127.0.0.1:{closed_port()}/sagas",
                     redis_server.url_db(8))
    start = engine.start_task(TRIP)
    with pytest.raises(sagas.StoreUnavailableError, match="saga store unavailable"):
        start.delay({"who": "ada"})
    assert redis.Redis.from_url(redis_server.url_db(8)).llen("nobody") == 0


def test_a_delayed_start_is_recorded_pending_and_started_when_its_message_is_lost(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from sagas.runtime.recovery import recover_stalled

    engine = _engine(f"sqlite:///{tmp_path}/d.db", redis_server.url_db(9))
    engine.upgrade_schema()
    start = engine.start_task(TRIP)
    published = redis.Redis.from_url(redis_server.url_db(9))

    result = start.apply_async(({"who": "ada"},), countdown=30)

    assert engine.handle(result.id).state is sagas.SagaState.PENDING
    published.flushdb()  # its start message is lost
    assert recover_stalled(engine._binding).redriven == [], "not before its time"
    report = recover_stalled(engine._binding, now=utcnow() + timedelta(seconds=31))
    assert report.redriven == [result.id]
    outcome = engine.handle(result.id).outcome()
    assert outcome.state is sagas.SagaState.RUNNING
    assert outcome.steps["hold"].state is sagas.StepState.RUNNING


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_burst_of_starts_survives_the_broker_wiped_right_after_the_calls_return(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, env={"ORDER_STEP_TIME_LIMIT": "3", "RECOVERY_GRACE": "1"})
    try:
        cluster.migrate()
        ids = cluster.client("delay", "40")["ids"]  # no worker yet: nothing consumed
        # Recorded before returning: running, or queued behind an order of the same customer
        # or item (the order's semantic locks).
        assert set(cluster.states(ids).values()) <= {"RUNNING", "WAITING"}
        assert len(cluster.states(ids)) == 40
        redis.Redis.from_url(cluster.redis.url).flushall()  # every first step's message gone
        cluster.start_workers({"all": ("inventory,payment,shipping,saga", 4)})
        cluster.start_beat()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            states = cluster.states(ids)
            if set(states.values()) <= {"COMPLETED", "COMPENSATED"}:
                break
            time.sleep(1)
        states = cluster.states(ids)
        left = [i for i, s in states.items() if s not in ("COMPLETED", "COMPENSATED")]
        assert not left, f"not terminal: {left}\n{cluster.logs()[-4000:]}"
        assert len(states) == 40
        audit = json.loads(cluster.sagas_cli("audit", "--json", check=False).stdout)
        assert audit["ok"], audit["violations"][:10]  # the ledgers: every effect exactly once
    finally:
        cluster.stop()

"""The transactional outbox and its relay: written with the transition, delivered at least once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue
from sqlalchemy import select, update

from sagas import SagaSettings
from sagas.coordinator import Decision, SagaSnapshot, StepSnapshot, Transition
from sagas.runtime import relay as outbox
from sagas.states import SagaState, StepState
from sagas.store import outbox as store_outbox
from sagas.store.sql import Store
from tests.conftest import Backend, broker_url, wait_for_saga
from tests.support import test_sagas as ts
from tests.support.engine import get_store, start_saga

ROOT = Path(__file__).resolve().parents[2]


def outbox_of(saga_ids: list[str]) -> list[Any]:
    with get_store().read() as conn:
        return conn.execute(
            select(outbox.outbox_t).where(outbox.outbox_t.c.saga_id.in_(saga_ids))
            .order_by(outbox.outbox_t.c.id)
        ).all()


class Consumer:
    """A queue bound to the events exchange before anything is published."""

    def __init__(self, url: str, binding: str = "#") -> None:
        self.conn = Connection(url)
        self.queue = Queue(f"obs-test-{uuid.uuid4().hex[:8]}",
                           Exchange(outbox.EXCHANGE, type="topic", durable=True),
                           routing_key=binding, auto_delete=False)
        self.queue(self.conn.default_channel).declare()
        self.simple = self.conn.SimpleQueue(self.queue)
        self.received: list[dict[str, Any]] = []

    def drain(self, timeout: float = 0.2) -> list[dict[str, Any]]:
        while True:
            try:
                message = self.simple.get(timeout=timeout)
            except self.simple.Empty:
                return self.received
            payload = message.payload
            payload["_routing_key"] = message.delivery_info.get("routing_key")
            self.received.append(payload)
            message.ack()

    def close(self) -> None:
        self.simple.close()  # its consumer first: RabbitMQ cancels consumers of a deleted queue
        self.queue(self.conn.default_channel).delete()
        self.conn.release()


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    c = Consumer(broker_url())
    yield c
    c.close()


# --- what is written ---------------------------------------------------------------------
def test_lifecycle_events_are_written_only_for_lifecycle_transitions():
    snap = SagaSnapshot("s", "order", SagaState.RUNNING, {"x": 1},
                        {"a": StepSnapshot("a", StepState.SUCCEEDED, 1, {"r": 1}),
                         "b": StepSnapshot("b", StepState.RUNNING, 1)})
    moves = Decision(transitions=[
        Transition(None, SagaState.PENDING, SagaState.RUNNING),
        Transition("a", StepState.RUNNING, StepState.SUCCEEDED, 1),
        Transition("b", StepState.PENDING, StepState.RUNNING, 1),
        Transition("b", StepState.RUNNING, StepState.RUNNING, 2, "retry"),
    ])
    rows = store_outbox.outbox_rows(snap, moves)
    assert [r["event"] for r in rows] == ["saga.started", "step.succeeded"]
    assert [r["routing_key"] for r in rows] == ["order.saga.started", "order.step.succeeded"]
    assert rows[0]["payload"]["input"] == {"x": 1}
    assert rows[1]["payload"]["result"] == {"r": 1}
    assert len({r["event_id"] for r in rows}) == 2
    assert store_outbox.outbox_rows(snap, Decision(transitions=moves.transitions[2:])) == []


@pytest.mark.integration
def test_a_compensated_saga_leaves_its_lifecycle_in_the_outbox_in_order(engine_backend: Backend):
    saga_id = start_saga(ts.linear, {"plan": {"c": {"fail": True}}})
    wait_for_saga(saga_id)
    rows = outbox_of([saga_id])
    assert [(r.event, r.payload["step"]) for r in rows] == [
        ("saga.started", None), ("step.succeeded", "a"), ("step.succeeded", "b"),
        ("step.failed", "c"), ("step.compensated", "b"), ("step.compensated", "a"),
        ("saga.compensated", None),
    ]
    assert all(r.status == outbox.PENDING for r in rows)
    assert len({r.event_id for r in rows}) == len(rows)
    assert "planned failure" in rows[3].payload["error"]


@pytest.mark.integration
def test_no_outbox_row_survives_a_transition_that_rolled_back(engine_backend: Backend):
    store = get_store()
    snap = SagaSnapshot(f"rollback-{uuid.uuid4()}", "t_linear", SagaState.RUNNING, {},
                        {n: StepSnapshot(n) for n in "abcd"})
    decision = Decision(transitions=[Transition(None, SagaState.PENDING, SagaState.RUNNING)])
    with pytest.raises(RuntimeError), store.begin() as conn:
        store.insert_new(conn, snap, decision, idempotency_key=None, digest="x",
                         stall_deadline=None, deadline_at=None)
        written = conn.execute(
            select(outbox.outbox_t.c.event).where(outbox.outbox_t.c.saga_id == snap.id)
        ).scalars().all()
        assert written == ["saga.started"], "written in the transition's own transaction"
        raise RuntimeError("the transition fails after its rows were written")
    assert outbox_of([snap.id]) == []


# --- the relay ---------------------------------------------------------------------------
@pytest.fixture
def scratch_store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path}/outbox.db")
    outbox.outbox_t.create(store.engine)
    return store


def add_rows(store: Store, n: int, saga: str = "order") -> list[str]:
    snap = SagaSnapshot("s-1", saga, SagaState.RUNNING, {}, {
        f"x{i}": StepSnapshot(f"x{i}", StepState.SUCCEEDED, 1, {}) for i in range(n)})
    moves = Decision(transitions=[
        Transition(f"x{i}", StepState.RUNNING, StepState.SUCCEEDED, 1) for i in range(n)])
    rows = store_outbox.outbox_rows(snap, moves)
    with store.begin() as conn:
        conn.execute(outbox.outbox_t.insert(), rows)
    return [r["event_id"] for r in rows]


def statuses(store: Store) -> list[tuple[str, int]]:
    with store.read() as conn:
        return [(r.status, r.attempts) for r in conn.execute(
            select(outbox.outbox_t).order_by(outbox.outbox_t.c.id))]


def test_a_failing_publish_is_retried_with_backoff_then_dead_lettered(scratch_store: Store):
    calls: list[str] = []

    def broker_down(row: dict[str, Any]) -> None:
        calls.append(row["event_id"])
        raise ConnectionError("broker down")

    # A backoff of 10-20 s: no machine is slow enough for it to pass between two calls.
    relay = outbox.Relay(scratch_store, SagaSettings(), broker_down, max_attempts=3, backoff=20,
                         backoff_max=20, retention=0)
    first, second = add_rows(scratch_store, 2)
    assert relay.run_once() == 1
    assert statuses(scratch_store) == [("pending", 1), ("pending", 0)], "stops at the outage"
    relay.run_once()
    assert calls == [first, second], "backoff: the failed row is not tried again at once"
    assert relay.run_once() == 0, "both rows wait out their backoff"
    for _ in range(10):  # let each backoff pass, as time would
        if {s for s, _ in statuses(scratch_store)} == {"dead"}:
            break
        with scratch_store.begin() as conn:
            conn.execute(update(outbox.outbox_t).values(available_at=outbox.outbox_t.c.created_at))
        relay.run_once()
    assert statuses(scratch_store) == [("dead", 3), ("dead", 3)]
    assert calls.count(first) == 3
    assert outbox.requeue_dead(scratch_store) >= 1
    sent: list[str] = []
    outbox.Relay(
        scratch_store, SagaSettings(), lambda row: sent.append(row["event_id"]), retention=0
    ).run_once()
    assert {s for s, _ in statuses(scratch_store)} == {"sent"}


def test_relay_publishes_to_the_topic_exchange_by_saga_and_event(
    scratch_store: Store, redis_server: Any
):
    only_completions = Consumer(broker_url(), binding="*.saga.completed")
    everything = Consumer(broker_url(), binding="billing.#")
    try:
        ids = add_rows(scratch_store, 3, saga="billing")
        snap = SagaSnapshot("s-2", "billing", SagaState.COMPLETED, {}, {})
        with scratch_store.begin() as conn:
            store_outbox.insert_outbox(conn, snap, Decision(
                transitions=[Transition(None, SagaState.RUNNING, SagaState.COMPLETED)]))
        relay = outbox.Relay(scratch_store, SagaSettings(), outbox.KombuPublisher(broker_url()),
                             retention=0)
        assert relay.run_once() == 4
        got = everything.drain()
        assert {m["id"] for m in got} >= set(ids)
        assert {m["_routing_key"] for m in got} == {"billing.step.succeeded",
                                                     "billing.saga.completed"}
        assert [m["event"] for m in only_completions.drain()] == ["saga.completed"]
        assert {s for s, _ in statuses(scratch_store)} == {"sent"}
    finally:
        only_completions.close()
        everything.close()


def start_relay(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "sagas.ops.cli", "-A", "config", "relay",
             "--interval", "0.05", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


@pytest.mark.integration
@pytest.mark.slow
def test_killing_a_relay_mid_batch_loses_no_event(
    engine_backend: Backend, consumer: Consumer, tmp_path: Path
):
    saga_ids = [start_saga(ts.linear, {}) for _ in range(5)]
    for saga_id in saga_ids:
        wait_for_saga(saga_id)
    expected = {r.event_id for r in outbox_of(saga_ids)}
    assert len(expected) == 5 * 6
    # Earlier tests' events are not this test's: settle them so both relays work on ours only.
    with get_store().begin() as conn:
        conn.execute(update(outbox.outbox_t).where(
            outbox.outbox_t.c.event_id.not_in(expected),
            outbox.outbox_t.c.status == outbox.PENDING).values(status=outbox.SENT))

    log = tmp_path / "relay.log"
    first = start_relay(engine_backend.env, log, "--batch", "10", "--throttle", "0.2",
                        "--lease", "2")
    try:
        deadline = time.monotonic() + 30
        while len(consumer.drain(0.05)) < 3 and time.monotonic() < deadline:
            pass
        assert len(consumer.received) >= 3, f"the first relay published nothing: {log.read_text()}"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    published_before_kill = {m["id"] for m in consumer.drain(0.3)}
    with get_store().read() as conn:
        unmarked = set(conn.execute(
            select(outbox.outbox_t.c.event_id).where(
                outbox.outbox_t.c.event_id.in_(published_before_kill & expected),
                outbox.outbox_t.c.status == outbox.PENDING)
        ).scalars())
    assert unmarked, "the kill did not land mid-batch: every published row was marked sent"

    second = start_relay(engine_backend.env, log, "--lease", "2")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(r.status == outbox.SENT for r in outbox_of(saga_ids)):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"unsent: {[r.status for r in outbox_of(saga_ids)]} {log.read_text()}")
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(10)
    received = [m["id"] for m in consumer.drain(0.5)]
    assert expected <= set(received), f"lost: {expected - set(received)}"
    once = sorted(i for i in unmarked if received.count(i) < 2)
    assert not once, (f"the killed batch is sent again; sent once only: {once} of "
                      f"{len(unmarked)} unmarked; rows: {outbox_of(saga_ids)}; relay log:\n"
                      f"{log.read_text()}")


@pytest.mark.integration
def test_a_relay_started_before_the_schema_waits_quietly_then_relays(
    redis_server: Any, tmp_path: Path
):
    from tests.conftest import _worker_env

    url = f"sqlite:///{tmp_path}/fresh.db"
    env = _worker_env(url)
    log = tmp_path / "relay.log"
    relay = start_relay(env, log)
    try:
        time.sleep(2.5)  # several polls with no tables yet
        upgraded = subprocess.run([sys.executable, "-m", "sagas.ops.cli", "-A", "config", "db",
                                   "upgrade"], cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=60)
        assert upgraded.returncode == 0, upgraded.stderr
        deadline = time.monotonic() + 15
        while "relaying" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(relay.pid, signal.SIGTERM)
        relay.wait(15)
    text = log.read_text()
    assert text.count("waiting for the saga tables") == 1, text
    assert "the saga tables are there: relaying" in text
    for noise in ("no such table", "relation", "Traceback", "SELECT", "[SQL"):
        assert noise not in text, text
